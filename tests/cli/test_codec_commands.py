"""`deltactl compress / apply / inspect` through the real Typer app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli import errors as exit_codes
from cli.main import app
from codec.checkpoint import Checkpoint

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_compress_inspect_apply(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    delta = tmp_path / "d.bdelta"
    res = run(
        "compress",
        base_dir,
        ft_dir,
        "-o",
        delta,
        "--base-name",
        "org/tiny",
        "--bits",
        "2",
        "--scale",
        "per-row",
        "--include",
        "*embed_tokens*",
        "--json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["delta_bytes"] == delta.stat().st_size and out["ratio"] > 1

    res = run("inspect", delta, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["base_model"] == "org/tiny"
    assert info["base_fingerprint"] == Checkpoint.open(base_dir).fingerprint()
    embed = next(t for t in info["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert embed["kind"] == "bitdelta" and embed["planes"] == 2 and embed["scale"] == "per-row"

    res = run("inspect", delta, "--tensors")
    assert res.exit_code == 0 and "org/tiny" in res.stdout and "model.embed_tokens.weight" in res.stdout

    res = run("apply", base_dir, delta, "-o", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tensors"] == len(Checkpoint.open(base_dir).names)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_compress_dtype_sets_the_reconstructed_models_dtype(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair  # fp32
    out = tmp_path / "d.bdelta"
    res = run(
        "compress", base_dir, ft_dir, "-o", out, "--base-name", "org/tiny", "--dtype", "bfloat16", "--json"
    )
    assert res.exit_code == 0, res.output
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["dtype"] == "bfloat16"
    assert {t["dtype"] for t in info["tensors"] if t["kind"] == "full"} == {"BF16"}


def test_human_output(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    res = run("compress", base_dir, ft_dir, "-o", tmp_path / "d.bdelta", "--base-name", "org/tiny")
    assert res.exit_code == 0 and "smaller than" in res.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["inspect", "{tmp}/missing.bdelta"], exit_codes.EXIT_INVALID, "invalid delta file: "),
        (
            ["inspect", "{tmp}/garbage.bdelta"],
            exit_codes.EXIT_INVALID,
            r"garbage.bdelta is not a deltastore delta \(not a safetensors file\)",
        ),
        (["compress", "{tmp}/nope", "{ft}", "-o", "{tmp}/x.bdelta"], exit_codes.EXIT_INVALID, "no such file"),
        (
            ["compress", "{base}", "{ft}", "-o", "{tmp}/x.bdelta", "--scale", "diagonal"],
            exit_codes.EXIT_INVALID,
            "scale mode",
        ),
        (
            ["compress", "{base}", "{ft}", "-o", "{tmp}/x.bdelta", "--dtype", "int8"],
            exit_codes.EXIT_INVALID,
            "dtype must be one of float16, bfloat16, float32, float64, got 'int8'",
        ),
        (
            ["apply", "{other}", "{tmp}/good.bdelta", "-o", "{tmp}/o"],
            exit_codes.EXIT_BASE_MISMATCH,
            "base mismatch: .*--force",
        ),
        (
            ["apply", "{base}", "{tmp}/good.bdelta", "-o", "{tmp}/o", "--max-shard-size", "lots"],
            exit_codes.EXIT_USAGE,
            "not a size",
        ),
    ],
)
def test_errors_are_one_line_with_distinct_exit_codes(llama_pair, tmp_path, args, code, message):
    import re

    from codec.compress import compress
    from tests.support.model_pairs import make_llama_pair

    base_dir, ft_dir = llama_pair
    (tmp_path / "garbage.bdelta").write_bytes(b"this is not a delta file at all")
    compress(base_dir, ft_dir, tmp_path / "good.bdelta")
    other = tmp_path / "other"
    if "{other}" in args:
        other, _ = make_llama_pair(tmp_path / "otherpair", seed=9)
    args = [a.format(tmp=tmp_path, base=base_dir, ft=ft_dir, other=other) for a in args]
    res = run(*args)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert re.search(message, res.output), res.output
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "bad.bdelta").write_bytes(b"nope")
    res = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "bad.bdelta")])
    assert res.exit_code != 0 and res.exception is not None


def test_version_and_help():
    res = run("--version")
    assert res.exit_code == 0 and res.stdout.startswith("deltactl ")
    res = run("compress", "--help")
    assert res.exit_code == 0 and "Example" in res.stdout


def _tree(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compress_refuses_an_output_that_is_one_of_its_inputs(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    before = {"base": _tree(base_dir), "ft": _tree(ft_dir)}
    for output in (ft_dir / "model.safetensors", base_dir / "model.safetensors", base_dir / "new.bdelta"):
        res = run("compress", base_dir, ft_dir, "-o", output, "--base-name", "org/tiny")
        assert res.exit_code == exit_codes.EXIT_INVALID, res.output
        assert "refusing to" in res.stderr and str(output) in res.stderr
    assert {"base": _tree(base_dir), "ft": _tree(ft_dir)} == before


@pytest.mark.parametrize("target", ["fifo", "directory"])
def test_compress_refuses_a_fifo_or_a_directory_and_leaves_no_temp_file(llama_pair, tmp_path, target):
    import os
    import stat

    base_dir, ft_dir = llama_pair
    out = tmp_path / "out"
    os.mkfifo(out) if target == "fifo" else out.mkdir()
    res = run("compress", base_dir, ft_dir, "-o", out, "--base-name", "org/tiny")
    assert res.exit_code == exit_codes.EXIT_INVALID, res.output
    assert f"{out} is {'a FIFO' if target == 'fifo' else 'a directory'}, not a regular file" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert stat.S_ISFIFO(out.stat().st_mode) if target == "fifo" else out.is_dir()


def test_apply_takes_the_sizes_the_loader_takes(llama_pair, tmp_path):
    base_dir, ft_dir = llama_pair
    delta = tmp_path / "d.bdelta"
    assert run("compress", base_dir, ft_dir, "-o", delta, "--base-name", "org/tiny").exit_code == 0
    whole = run("apply", base_dir, delta, "-o", tmp_path / "one", "--max-shard-size", "8G", "--json")
    assert whole.exit_code == 0, whole.output
    assert json.loads(whole.stdout)["shards"] == 1
    split = run("apply", base_dir, delta, "-o", tmp_path / "many", "--max-shard-size", "64K", "--json")
    assert split.exit_code == 0, split.output
    assert json.loads(split.stdout)["shards"] > 1


def test_compress_takes_the_base_name_from_its_config_or_refuses(llama_pair, tmp_path):
    import shutil

    base_dir, ft_dir = llama_pair
    out = tmp_path / "d.bdelta"
    res = run("compress", base_dir, ft_dir, "-o", out)
    assert res.exit_code == exit_codes.EXIT_INVALID, res.output
    assert res.stderr.startswith(f"error: base name: the base {base_dir} does not record its registry name")
    assert res.stderr.rstrip().endswith("(pass --base-name ORG/MODEL)") and not out.exists()
    bad = run("compress", base_dir, ft_dir, "-o", out, "--base-name", "base")
    assert (
        bad.exit_code == exit_codes.EXIT_INVALID and "--base-name 'base' is not a registry name" in bad.stderr
    )

    named = tmp_path / "named-base"
    shutil.copytree(base_dir, named)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/from-config"}))
    res = run("compress", named, ft_dir, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(run("inspect", out, "--json").stdout)["base_model"] == "org/from-config"


def test_compress_refuses_a_base_of_another_shape_unless_allowed_dense(llama_pair, tmp_path):
    from tests.support.model_pairs import make_llama_pair

    base_dir, _ = llama_pair
    _, wide_ft = make_llama_pair(tmp_path / "wide", seed=2, hidden=128)
    out = tmp_path / "d.bdelta"
    res = run("compress", base_dir, wide_ft, "-o", out, "--base-name", "org/tiny")
    assert res.exit_code == exit_codes.EXIT_BASE_MISMATCH, res.output
    assert (
        "no tensor can be compressed: every weight's shape differs from the base's (first: model."
        in res.stderr
    )
    assert (
        "in the fine-tune, [" in res.stderr
        and "] in the base); is this the fine-tune's base model?" in res.stderr
    )
    assert "(pass --allow-dense to store every tensor dense anyway)" in res.stderr and not out.exists()
    dense = run(
        "compress", base_dir, wide_ft, "-o", out, "--base-name", "org/tiny", "--allow-dense", "--json"
    )
    assert dense.exit_code == 0, dense.output
    assert json.loads(dense.stdout)["binarized"] == 0 and json.loads(dense.stdout)["dense"] > 0
