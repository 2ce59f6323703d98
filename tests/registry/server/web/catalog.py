"""A small registry worth browsing, filled over the real HTTP API: two bases, public and private
repositories, versions with fidelity and calibration, tags, and a description holding markup.

    fill_catalog(client)        # client: TestClient or httpx.Client on a live registry
"""

from __future__ import annotations

import json

import numpy as np

from tests.support.corpus import encode, storage_form
from tests.support.harness import send_bytes

LLAMA = ("org/llama-tiny", "sha256:" + "1a" * 32)
QWEN = ("qwen/Qwen2-mini", "sha256:" + "2b" * 32)
HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


def delta(
    base: tuple[str, str],
    variant: int,
    *,
    planes: int = 1,
    per_row: bool = False,
    fidelity: dict | None = None,
    calibration: dict | None = None,
    hf_config: dict | None = None,
    rows: int = 32,
    dense: bool = True,
) -> bytes:
    """A valid format-v1 delta of `base`: one binarized matrix (and a dense norm), distinct per variant."""
    rng = np.random.default_rng(variant)
    scale_shape = [planes, rows if per_row else 1]
    tensors = [
        (
            "model.layers.0.mlp.up_proj.weight.scale",
            "F32",
            scale_shape,
            (rng.random(int(np.prod(scale_shape))) * 0.01 + 0.001).astype("<f4").tobytes(),
        ),
        ("model.layers.0.mlp.up_proj.weight.sign", "U8", [planes, rows, 8], rng.bytes(planes * rows * 8)),
    ]
    if dense:
        tensors.insert(
            0, ("model.norm.weight.full", "F16", [64], np.linspace(0.5, 1.5, 64).astype("<f2").tobytes())
        )
    meta = {
        "format": "deltastore.delta",
        "format_version": "1",
        "codec": "bitdelta",
        "base_model": base[0],
        "base_fingerprint": base[1],
        "dtype": "float16",
        "created_with": "deltastore 0.1.0",
        "x-planes": str(planes),
        "x-scale": "per-row" if per_row else "per-matrix",
        "x-finetuned-bytes": str(rows * 64 * 2 * 40 + 128 * (variant + 1)),
    }
    if fidelity is not None:
        meta["fidelity"] = json.dumps(fidelity)
    if calibration is not None:
        meta["calibration"] = json.dumps(calibration)
    if hf_config is not None:
        meta["x-hf-config"] = json.dumps(hf_config, sort_keys=True)
    return encode(tensors, meta)


def push(client, repo: str, raw: bytes, *, headers: dict | None = None, description: str = "") -> dict:
    stored = storage_form(raw)
    r = client.post(
        f"/v1/repos/{repo}/uploads", json=stored.declaration(description=description), headers=headers
    )
    assert r.status_code == 201, r.text
    upload = r.json()
    assert send_bytes(client, upload, stored.data, headers=headers) is None
    r = client.post(upload["complete_url"], headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def fidelity(i: int) -> dict:
    return {
        "gain_recovered": 0.80 + 0.03 * i,
        "kl_to_finetuned": 0.05 / (i + 1),
        "top1_agreement": 0.90 + 0.015 * i,
        "greedy_agreement": 0.85,
        "eval": "held-out python, 64 sequences",
    }


def fill_catalog(client, *, headers: dict | None = None) -> None:
    """The catalog the page tests and the browser test browse (see the module docstring)."""
    for (name, fingerprint), arch, params in (
        (LLAMA, "LlamaForCausalLM", 1_100_000_000),
        (QWEN, "Qwen2ForCausalLM", 494_000_000),
    ):
        r = client.post(
            "/v1/bases",
            json={"name": name, "fingerprint": fingerprint, "architecture": arch, "parameter_count": params},
            headers=headers,
        )
        assert r.status_code == 201, r.text
    repos = [
        ("acme/math", LLAMA, "Grade-school math fine-tune, distilled scales.", "public"),
        ("acme/code", LLAMA, HOSTILE, "public"),
        ("lab/secret", LLAMA, "internal experiments", "private"),
        ("qwen-fans/chat", QWEN, "Chat tune of Qwen2-mini.", "public"),
        ("acme/empty", LLAMA, "", "public"),
    ]
    for full, base, description, visibility in repos:
        ns, name = full.split("/")
        r = client.post(
            "/v1/repos",
            json={
                "namespace": ns,
                "name": name,
                "base": base[0],
                "description": description,
                "visibility": visibility,
            },
            headers=headers,
        )
        assert r.status_code == 201, r.text
    for i in range(4):
        push(
            client,
            "acme/math",
            delta(
                LLAMA,
                i,
                planes=1 + (i >= 2),
                fidelity=fidelity(i),
                calibration={"dataset": "gsm8k-train", "steps": 100 * (i + 1), "loss": 0.5 / (i + 1)},
            ),
            headers=headers,
        )
    r = client.put("/v1/repos/acme/math/tags/prod", json={"version": 3}, headers=headers)
    assert r.status_code == 200, r.text
    push(
        client,
        "acme/code",
        delta(LLAMA, 10, per_row=True, fidelity={**fidelity(1), "note": HOSTILE}),
        headers=headers,
        description=HOSTILE,
    )
    push(client, "lab/secret", delta(LLAMA, 20), headers=headers)
    config = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "architectures": ["Qwen2ForCausalLM"],
    }
    push(client, "qwen-fans/chat", delta(QWEN, 30, fidelity=fidelity(2), hf_config=config), headers=headers)
