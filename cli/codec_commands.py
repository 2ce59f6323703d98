"""`deltactl compress / apply / inspect`: the codec from the command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from codec import codecs, sizes
from codec.errors import BaseMismatchError, BaseNameError, NothingToCompressError
from codec.format import is_registry_base_name
from codec.summary import summarize

from .console import emit_json, err, human_bytes, loss_progress, out, tensor_progress
from .errors import handle_errors


@handle_errors(hints={NothingToCompressError: "pass --allow-dense to store every tensor dense anyway"})
def compress_cmd(
    base: Annotated[Path, typer.Argument(help="Base model: HF directory or .safetensors file.")],
    finetuned: Annotated[Path, typer.Argument(help="Fine-tuned model: HF directory or .safetensors file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta file to write (.bdelta).")],
    base_name: Annotated[
        str | None,
        typer.Option(
            "--base-name",
            help="Registry name of the base, org/model (default: the _name_or_path of its config.json).",
        ),
    ] = None,
    allow_dense: Annotated[
        bool,
        typer.Option(
            "--allow-dense",
            help=(
                "Write the delta even if no tensor can be compressed because every shape differs "
                "from the base's."
            ),
        ),
    ] = False,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help=(
                "dtype of the reconstructed model, e.g. float16 or bfloat16 (default: the fine-tune's); "
                "changed dense tensors are stored in it."
            ),
        ),
    ] = None,
    bits: Annotated[
        int, typer.Option("--bits", min=1, max=8, help="Sign planes per weight (residual binarization).")
    ] = 1,
    scale: Annotated[str, typer.Option("--scale", help="per-matrix or per-row scales.")] = "per-matrix",
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include", help="Glob of tensors to binarize too (e.g. '*embed_tokens*'); repeatable."
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Glob of tensors to keep dense; repeatable.")
    ] = None,
    codec: Annotated[
        str,
        typer.Option(
            "--codec",
            help="bitdelta (1-bit signs), deltadq (group-wise dropout + quantization), lowrank-mp "
            "(mixed-precision SVD factors), hybrid (fp16 low rank + signs of the residual), or another "
            "registered codec (docs/codecs.md, docs/lowrank.md).",
        ),
    ] = "bitdelta",
    ratio: Annotated[
        float | None,
        typer.Option(
            "--ratio",
            help="deltadq (16-16384), lowrank-mp (2-16384), hybrid (below 16/planes): size ratio vs "
            "fp16 that every compressed tensor keeps.",
            rich_help_panel="DeltaDQ",
        ),
    ] = None,
    dq_bits: Annotated[
        int | None,
        typer.Option(
            "--dq-bits", help="deltadq: bits per surviving value (with --keep).", rich_help_panel="DeltaDQ"
        ),
    ] = None,
    keep: Annotated[
        float | None,
        typer.Option(
            "--keep",
            help="deltadq: fraction of delta weights kept per group (with --dq-bits).",
            rich_help_panel="DeltaDQ",
        ),
    ] = None,
    group_size: Annotated[
        str,
        typer.Option(
            "--group-size",
            help="deltadq: dropout group size, or 'auto' to search per tensor; lowrank-mp: quantization "
            "group size ('auto' = 128).",
            rich_help_panel="DeltaDQ",
        ),
    ] = "auto",
    parts: Annotated[
        int,
        typer.Option(
            "--parts",
            min=1,
            help="deltadq: separate parts the codes are split into.",
            rich_help_panel="DeltaDQ",
        ),
    ] = 1,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            min=1,
            help="hybrid: rank of the fp16 low-rank part (capped at each tensor's full rank); or --ratio.",
            rich_help_panel="Low rank",
        ),
    ] = None,
    dq_seed: Annotated[
        int,
        typer.Option(
            "--dq-seed", min=0, help="deltadq: seed of the dropout mask.", rich_help_panel="DeltaDQ"
        ),
    ] = 0,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            "--calibrate",
            help=(
                "Calibration text (a file, a directory of text files, or JSONL with a 'text' field): "
                "bitdelta and hybrid distill the scales on it; deltadq chooses each tensor's group size "
                "and bits, lowrank-mp its bands and factors, by the output error on its activations."
            ),
            rich_help_panel="Scale distillation",
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Distillation steps.", rich_help_panel="Scale distillation")
    ] = 200,
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="Sequences per step.", rich_help_panel="Scale distillation")
    ] = 4,
    seq_len: Annotated[
        int,
        typer.Option("--seq-len", min=1, help="Tokens per sequence.", rich_help_panel="Scale distillation"),
    ] = 128,
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            min=1,
            help="Calibration sequences drawn from DATA.",
            rich_help_panel="Scale distillation",
        ),
    ] = 800,
    lr: Annotated[
        float,
        typer.Option(
            "--lr", help="AdamW learning rate (cosine decay).", rich_help_panel="Scale distillation"
        ),
    ] = 1e-4,
    loss: Annotated[
        str,
        typer.Option(
            "--loss",
            help="mse or kl between teacher and student logits.",
            rich_help_panel="Scale distillation",
        ),
    ] = "mse",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for sampling and order.", rich_help_panel="Scale distillation")
    ] = 0,
    offload_teacher: Annotated[
        bool,
        typer.Option(
            "--offload-teacher",
            help="Precompute teacher logits to disk and free the teacher.",
            rich_help_panel="Scale distillation",
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            "--device", help="Device for distillation (cpu, cuda).", rich_help_panel="Scale distillation"
        ),
    ] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Compress FINETUNED against BASE into a 1-bit delta, optionally distilling its scales.

    Example: deltactl compress ./llama-base ./llama-math -o math.bdelta --base-name org/llama

    Example: deltactl compress ./base ./math -o math.bdelta --calibrate data.jsonl --steps 200

    Example: deltactl compress ./base ./math -o math.bdelta --codec deltadq --ratio 64

    Example: deltactl compress ./base ./math -o math.bdelta --codec lowrank-mp --ratio 16

    Example: deltactl compress ./base ./math -o math.bdelta --codec hybrid --rank 16
    """
    from codec.compress import CompressOptions, compress  # torch: imported only when compressing

    if group_size != "auto" and not group_size.isdigit():
        raise typer.BadParameter(f"--group-size must be a positive integer or 'auto', got {group_size!r}")
    chosen = codecs.get(codec)
    # Each codec reads the flags of its own option panel; the others' stay at their defaults.
    flags = {
        "bitdelta": {"planes": bits, "scale_mode": scale},
        "deltadq": {
            "ratio": ratio,
            "bits": dq_bits,
            "keep": keep,
            "group_size": None if group_size == "auto" else int(group_size),
            "parts": parts,
            "seed": dq_seed,
        },
        "lowrank-mp": {"ratio": ratio} | ({} if group_size == "auto" else {"group_size": int(group_size)}),
        "hybrid": {"rank": rank, "ratio": ratio, "planes": bits, "scale_mode": scale},
    }
    options = CompressOptions(
        codec=chosen.options_type(**flags.get(codec, {})),
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        base_name=base_name,  # type: ignore[arg-type]
        allow_dense=allow_dense,
        dtype=dtype,
    )
    options = dataclasses.replace(options, base_name=_registry_base_name(base, base_name))
    # Calibration text distills the scales of a codec that has them (BitDelta); for the others
    # (DeltaDQ) the layer-input moments it yields steer the per-tensor search.
    distill = calibrate is not None and chosen.calibration == "distill"
    distill_options = moments = None
    if calibrate is not None and not distill:
        from codec.activations import input_moments

        with err.status("measuring layer inputs on the calibration text"):
            moments = input_moments(
                finetuned,
                calibrate,
                samples=min(samples, 128),
                seq_len=seq_len,
                batch=batch,
                seed=seed,
                device=device,
                base_dir=base,
            )
    if distill:
        from codec.distill import DistillOptions

        distill_options = DistillOptions(
            steps=steps,
            batch=batch,
            seq_len=seq_len,
            samples=samples,
            lr=lr,
            loss=loss,
            seed=seed,
            offload_teacher=offload_teacher,
        )  # type: ignore[arg-type]
    target = output.with_name(output.name + ".init") if distill else output
    try:
        with tensor_progress("compressing") as progress:
            report = compress(base, finetuned, target, options, progress=progress, input_moments=moments)
        calibration = None
        if distill:
            from codec.distill import distill_scales

            with loss_progress("distilling scales", distill_options.steps) as progress:
                distilled = distill_scales(
                    base,
                    finetuned,
                    target,
                    output,
                    calibrate,
                    distill_options,
                    device=device,
                    progress=progress,
                )
            report.delta_bytes = output.stat().st_size
            calibration = {
                "initial_loss": distilled.initial_loss,
                "final_loss": distilled.final_loss,
                "steps": distill_options.steps,
                "seconds": round(distilled.seconds, 1),
            }
    finally:
        if distill:
            target.unlink(missing_ok=True)
    result = {
        "path": str(output),
        "base_fingerprint": report.base_fingerprint,
        "binarized": len(report.binarized),
        "dense": len(report.dense),
        "unchanged": len(report.unchanged),
        "finetuned_bytes": report.finetuned_bytes,
        "delta_bytes": report.delta_bytes,
        "ratio": report.ratio,
        "calibration": calibration,
        "fallbacks": report.fallbacks,
    }
    if as_json:
        emit_json(result)
        return
    out.print(
        f"wrote {output}: {human_bytes(report.delta_bytes)} "
        f"({report.ratio:.2f}x smaller than the {human_bytes(report.finetuned_bytes)} fine-tune); "
        f"{len(report.binarized)} binarized, {len(report.dense)} "
        f"dense, {len(report.unchanged)} unchanged tensors"
    )
    for name, reason in sorted(report.fallbacks.items()):
        out.print(f"  {name}: {reason}")
    if calibration:
        out.print(
            f"distilled scales: calibration loss {calibration['initial_loss']:.4g} -> "
            f"{calibration['final_loss']:.4g} in {calibration['steps']} steps ({calibration['seconds']}s)"
        )


def _registry_base_name(base: Path, given: str | None) -> str:
    """The base's registry name: --base-name, else the checkpoint's own `_name_or_path`; a delta
    without a valid one could never be pushed, so compress refuses to write it."""
    from codec.checkpoint import Checkpoint
    from codec.compress import registry_base_name

    if given is not None:
        if not is_registry_base_name(given):
            raise BaseNameError(
                f"--base-name {given!r} is not a registry name (org/model, e.g. meta-llama/Llama-3.1-8B)"
            )
        return given
    recorded = registry_base_name(Checkpoint.open(base))
    if recorded is None:
        raise BaseNameError(
            f"the base {base} does not record its registry name "
            "(config.json has no _name_or_path of the form "
            "org/model), so the delta could not be pushed"
        )
    return recorded


@handle_errors(hints={BaseMismatchError: "use --force to apply anyway"})
def apply_cmd(
    base: Annotated[Path, typer.Argument(help="Base model the delta was made against.")],
    delta: Annotated[Path, typer.Argument(help="Delta file (.bdelta).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the reconstructed model.")],
    force: Annotated[
        bool, typer.Option("--force", help="Apply even if the base fingerprint differs.")
    ] = False,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")
    ] = "5GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Reconstruct the fine-tuned model from BASE + DELTA into a HF model directory.

    Example: deltactl apply ./llama-base math.bdelta -o ./llama-math-restored
    """
    from codec.apply import apply_delta  # torch: imported only when applying

    with tensor_progress("applying") as progress:
        report = apply_delta(
            base, delta, output, force=force, max_shard_bytes=parse_size(max_shard_size), progress=progress
        )
    if as_json:
        emit_json(
            {
                "out_dir": str(report.out_dir),
                "shards": report.shards,
                "tensors": report.tensors,
                "bytes": report.bytes_written,
                "base_fingerprint": report.base_fingerprint,
            }
        )
        return
    out.print(
        f"wrote {report.out_dir}: {report.tensors} tensors, "
        f"{human_bytes(report.bytes_written)} in {report.shards} shard(s)"
    )


@handle_errors
def inspect_cmd(
    delta: Annotated[Path, typer.Argument(help="Delta file (.bdelta).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
) -> None:
    """Validate DELTA and show its metadata, tensors, sizes and ratio.

    Example: deltactl inspect math.bdelta --json
    """
    info = summarize(delta)
    if as_json:
        emit_json(info)
        return
    grid = Table.grid(padding=(0, 2))
    for key, value in (
        ("file", info["path"]),
        ("codec", info["codec"]),
        ("base model", info["base_model"]),
        ("base fingerprint", info["base_fingerprint"]),
        ("dtype", info["dtype"]),
        (
            "tensors",
            f"{sum(n for k, n in info['counts'].items() if k != 'full')} "
            f"compressed, {info['counts']['full']} dense",
        ),
        ("size", human_bytes(info["file_bytes"])),
        ("fine-tune size", human_bytes(info["finetuned_bytes"])),
        ("ratio", f"{info['ratio']:.2f}x" if info["ratio"] else "-"),
        (
            "bits/weight (compressed)",
            f"{info['bits_per_binarized_weight']:.3f}" if info["bits_per_binarized_weight"] else "-",
        ),
    ):
        grid.add_row(f"[bold]{key}", str(value))
    for key, value in sorted(info["metadata"].items()):
        if key not in ("format", "codec", "base_model", "base_fingerprint", "dtype"):
            grid.add_row(f"[dim]{key}", str(value))
    out.print(grid)
    if tensors:
        table = Table("tensor", "kind", "shape / parameters", "bytes")
        for t in info["tensors"]:
            if t["kind"] == "full":
                shown = f"{t['dtype']}{t['shape']}"
            else:
                shown = " ".join(f"{k}={v}" for k, v in t.items() if k not in ("name", "kind", "bytes"))
            table.add_row(t["name"], t["kind"], shown, human_bytes(t["bytes"]))
        out.print(table)


def parse_size(text: str) -> int:
    """A positive size for an option ('5GB', '8GiB', '8G', '1024'): codec.sizes' one parser."""
    try:
        size = sizes.parse_size(text)
    except sizes.SizeError as exc:
        raise typer.BadParameter(str(exc)) from None
    if size <= 0:
        raise typer.BadParameter(f"not a size: {text!r} (must be more than 0 bytes)")
    return size


__all__ = ["compress_cmd", "apply_cmd", "inspect_cmd", "parse_size", "err"]
