"""How values read on the pages: the fidelity figures `deltactl show` reads first, codec lines,
and the per-tensor summary of each kind the format allows."""

from __future__ import annotations

import pytest

from codec.format import validate_delta_header
from registry.server.web import present
from registry.server.web.tensors import summarize_entries
from tests.support.corpus import seed_deltas


def test_fidelity_figures_follow_deltactl_show():
    record = {"gain_recovered": 0.931, "kl_to_finetuned": 0.01234, "top1_agreement": 0.97, "loss": 2.1}
    assert present.fidelity_cells(record) == ["93.1%", "0.0123", "97.0%"]
    assert present.fidelity_summary(record) == "gain kept 93.1% · KL 0.0123 · top-1 97.0%"
    assert (
        present.fidelity_summary({"kl": 0.5, "eval": "x"}) == "kl 0.5"
    )  # other measures, like deltactl show
    assert present.fidelity_summary({"eval": "x"}) == "recorded"
    assert present.fidelity_cells(None) == ["–", "–", "–"]
    assert present.fidelity_cells({"gain_recovered": "n/a", "top1_agreement": True}) == ["n/a", "–", "True"]


@pytest.mark.parametrize(
    ("codec", "bits", "meta", "line"),
    [
        ("bitdelta", 1, {"x-scale": "per-matrix"}, "bitdelta · 1 plane · per-matrix"),
        ("bitdelta", 2, {"x-scale": "per-row"}, "bitdelta · 2 planes · per-row"),
        ("deltadq", None, {"deltadq": '{"bits": 4, "ratio": 64}'}, "deltadq · 4-bit · ratio 64"),
        ("deltadq", None, {"deltadq": "not json"}, "deltadq"),
        (
            "lowrank-mp",
            None,
            {"lowrank": '{"ratio": 16, "group_size": 128}'},
            "lowrank-mp · ratio 16 · group 128",
        ),
        ("lowrank-mp", None, {"lowrank": "[]"}, "lowrank-mp"),
        (
            "hybrid",
            None,
            {"hybrid": '{"rank": null, "ratio": 8, "planes": 2, "scale": "per-row"}'},
            "hybrid · ratio 8 · 2 planes · per-row",
        ),
        (None, None, None, "–"),
    ],
)
def test_codec_line(codec, bits, meta, line):
    assert present.codec_line(codec, bits, meta) == line


def test_tensor_summary_counts_each_kind_and_its_bytes():
    for name, raw in seed_deltas().items():
        _, entries = validate_delta_header(raw, len(raw))
        summary = summarize_entries(entries)
        assert summary.tensors == len(entries)
        assert sum(k.tensors for k in summary.kinds) == len(entries)
        assert sum(k.bytes for k in summary.kinds) == sum(e.nbytes for e in entries.values())
        kinds = {k.kind for k in summary.kinds}
        assert kinds == {e.kind for e in entries.values()}, name
        if "deltadq" in kinds:
            assert (
                summary.covered() is None
            )  # weights per DeltaDQ row are in the tensor bytes, not the header
    two_planes = seed_deltas()["per_row_2_planes_with_full"]
    summary = summarize_entries(validate_delta_header(two_planes, len(two_planes))[1])
    assert summary.planes == [2] and summary.scale_modes == ["per-row"]
    assert {k.kind: k.tensors for k in summary.kinds} == {"bitdelta": 1, "full": 2}


def test_sizes_and_metadata_rows():
    assert [present.human_bytes(n) for n in (0, 1023, 1024, 5 << 20, None)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "–",
    ]
    assert present.parameters(1_100_000_000) == "1.1B" and present.parameters(None) == "–"
    assert present.rows({"a": {"b": 1, "c": [1, 2]}, "d": 0.123456789}) == [
        ("a.b", "1"),
        ("a.c", "[1, 2]"),
        ("d", "0.123457"),
    ]
