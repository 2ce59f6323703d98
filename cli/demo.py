"""`deltactl demo`: the whole codec on a real small model pair, narrated.

Builds (once, cached) SmolLM2-135M-Instruct as the base and a short real fine-tune of it on
Python sources, compresses the fine-tune to a 1-bit delta, inspects it, applies it, and
reports sizes, reconstruction error and how much of the fine-tune's loss gain survived.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .console import err, human_bytes, out
from .errors import handle_errors


def _say(step: str) -> None:
    err.print(f"[bold cyan]==>[/] {step}")


@handle_errors
def demo_cmd(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the model pair and outputs are kept.")] = Path(".data/demo"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Fine-tuning steps for the demo pair.")] = 12,
) -> None:
    """Run the codec end to end on a real small model pair (SmolLM2-135M + a Python fine-tune)."""
    import torch

    from codec.apply import apply_delta
    from codec.checkpoint import Checkpoint
    from codec.compress import CompressOptions, compress
    from codec.summary import summarize
    from eval import pair

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"base model: SmolLM2-135M-Instruct -> {workdir / 'base'}")
    base_dir = pair.build_base(workdir / "base", log=lambda m: err.print(f"    {m}"))
    recipe = pair.Recipe(steps=steps, batch=4, seq_len=128, lr=1e-4)
    _say(f"fine-tune: {recipe.steps} full AdamW steps on Python stdlib sources (batch {recipe.batch}×{recipe.seq_len})")
    ft_dir = pair.finetune(base_dir, workdir / f"finetuned-{steps}", recipe, log=lambda m: err.print(f"    {m}"))

    outputs = {}
    for label, options in (
        ("paper setting (embeddings dense)", CompressOptions(base_name="smollm2-135m-instruct")),
        ("embeddings binarized too", CompressOptions(base_name="smollm2-135m-instruct", include=("*embed_tokens*",))),
    ):
        path = workdir / ("delta.bdelta" if not outputs else "delta-embed.bdelta")
        _say(f"deltactl compress  ({label}) -> {path.name}")
        start = time.perf_counter()
        report = compress(base_dir, ft_dir, path, options)
        outputs[label] = (path, report, time.perf_counter() - start)

    path, report, seconds = outputs["paper setting (embeddings dense)"]
    _say(f"deltactl inspect {path.name}")
    info = summarize(path)
    out.print(
        f"    codec={info['codec']} base={info['base_model']} dtype={info['dtype']} "
        f"{info['counts']['bitdelta']} binarized / {info['counts']['full']} dense tensors, "
        f"{info['bits_per_binarized_weight']:.3f} bits per binarized weight"
    )
    applied = workdir / "applied"
    _say(f"deltactl apply base {path.name} -> {applied}")
    import shutil

    shutil.rmtree(applied, ignore_errors=True)
    apply_delta(base_dir, path, applied)

    _say("measuring reconstruction error and held-out loss (fp32)")
    base, ft, rec = (Checkpoint.open(d) for d in (base_dir, ft_dir, applied))
    num = den = 0.0
    for name in report.binarized:
        f = ft.get(name).float()
        num += float((rec.get(name).float() - f).pow(2).sum())
        den += float((f - base.get(name).float()).pow(2).sum())
    losses = {label: pair.heldout_loss(d) for label, d in (("base", base_dir), ("fine-tuned", ft_dir), ("1-bit delta", applied))}
    gain = losses["base"] - losses["fine-tuned"]

    out.print()
    out.print("[bold]result[/]")
    for label, (p, r, s) in outputs.items():
        out.print(f"    {label:34s} {human_bytes(r.delta_bytes):>10}  ratio {r.ratio:5.2f}x vs the "
                  f"{human_bytes(r.finetuned_bytes)} fp16 fine-tune  (compressed in {s:.1f}s)")
    out.print(f"    relative error of binarized weights ‖Ŵ−W_ft‖/‖W_ft−W_base‖ = {(num / den) ** 0.5:.3f}")
    for label, value in losses.items():
        out.print(f"    held-out loss  {label:12s} {value:.4f}")
    if gain > 0:
        out.print(f"    fine-tune gain recovered by the 1-bit delta: {100 * (losses['base'] - losses['1-bit delta']) / gain:.1f}%")
    out.print(f"    total {time.perf_counter() - t0:.0f}s; everything is under {workdir}")
    del torch
