"""The low-rank codecs in the registry: pushed through the real registry on 127.0.0.1, stored and
verified, listed and shown with their codec, and the web pages show ratio / rank and their tensors."""

from __future__ import annotations

import httpx
import pytest

from codec.codecs.hybrid import HybridOptions
from codec.codecs.lowrank_mp import LowRankMPOptions
from codec.compress import CompressOptions, compress
from codec.format import DeltaFile

from .registry_fixtures import (  # noqa: F401  (fixtures)
    BASE,
    deltactl,
    deltactl_json,
    deltas,
    registry,
    start_registry,
    with_base,
)


@pytest.fixture(scope="module")
def low_rank_deltas(llama_pair, tmp_path_factory):
    base_dir, ft_dir = llama_pair
    out = tmp_path_factory.mktemp("lr-deltas")
    paths = {
        "lowrank-mp": out / "lr.bdelta",
        "hybrid": out / "h.bdelta",
    }
    compress(
        base_dir,
        ft_dir,
        paths["lowrank-mp"],
        CompressOptions(codec=LowRankMPOptions(ratio=32), base_name=BASE),
    )
    compress(base_dir, ft_dir, paths["hybrid"], CompressOptions(codec=HybridOptions(rank=4), base_name=BASE))
    return paths


def test_low_rank_deltas_are_stored_listed_and_shown(low_rank_deltas, with_base, registry):
    pushed = {codec: deltactl_json("push", path, f"acme/{codec}") for codec, path in low_rank_deltas.items()}
    listed = {r["full_name"]: r["latest"]["codec"] for r in deltactl_json("list")}
    assert listed == {"acme/lowrank-mp": "lowrank-mp", "acme/hybrid": "hybrid"}
    for codec, path in low_rank_deltas.items():
        shown = deltactl("show", f"acme/{codec}")
        assert shown.exit_code == 0 and codec in shown.stdout
        # Stored as pushed: the pulled file is byte-identical and opens as this codec.
        pulled = deltactl_json("pull", f"acme/{codec}")
        assert pulled["digest"] == pushed[codec]["digest"]
        assert open(pulled["path"], "rb").read() == path.read_bytes()
        assert DeltaFile.open(pulled["path"]).codec == codec

    repo_page = httpx.get(f"{registry.url}/acme/lowrank-mp").text
    assert "lowrank-mp · ratio 32 · group 128" in repo_page
    version_page = httpx.get(f"{registry.url}/acme/hybrid@1").text
    assert "hybrid · rank 4 · 1 plane · per-matrix" in version_page
    assert "low rank + binarized residual" in version_page  # the tensor summary's label
    lr_page = httpx.get(f"{registry.url}/acme/lowrank-mp@1").text
    assert "low-rank, mixed precision" in lr_page
