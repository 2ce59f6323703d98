"""The demo's serving ending on a tiny model: after the registry part, `deltactl serve-model` in a
child process answers two pushed deltas and the base at once over the OpenAI API."""

from __future__ import annotations

import shutil

import pytest

from cli.demo import registry_round_trip, serving_round_trip
from codec.compress import CompressOptions, compress
from tests.support.model_pairs import save_byte_tokenizer

BASE = "org/tiny-llama"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DELTACTL_REGISTRY", raising=False)


def test_the_demos_serving_part(tmp_path, llama_pair):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(llama_pair[0], base)
    save_byte_tokenizer(base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    first = compress(base, llama_pair[1], tmp_path / "d.bdelta", CompressOptions(base_name=BASE)).path
    second = compress(
        base,
        llama_pair[1],
        tmp_path / "d-embed.bdelta",
        CompressOptions(base_name=BASE, include=("*embed_tokens*",)),
    ).path
    registry_round_trip(tmp_path, base, first, base_name=BASE, repo="demo/tiny")
    answers = serving_round_trip(tmp_path, base, second, base_name=BASE, repo="demo/tiny")
    assert [a["model"] for a in answers] == ["demo/tiny", "demo/tiny-embed", BASE]
    assert all(a["tokens"] > 0 for a in answers)
    assert {"demo/tiny", "demo/tiny-embed"} <= set(answers[0]["resident_after"])
