"""Scale distillation (BitDelta's second stage): train only the delta's scales, signs frozen,
so the compressed model's logits match the fine-tuned model's on calibration text.

Teacher = the fine-tuned model; student = base weights + Σ_p scale_p ⊙ sign_p on every
binarized tensor (plus a hybrid delta's low-rank part b·a, frozen), with the delta's dense
tensors (norms, embeddings, …) loaded from the delta and frozen. Loss = MSE (default) or KL
between teacher and student logits; AdamW, cosine.

Scales are kept >= 0 (projected after every step): the signs are the delta's, so a negative
scale turns a matrix's update against its fine-tune; 0 is the most it may do (leave it at base).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .activations import token_samples, tokenizer_for
from .bitdelta import unpack_signs
from .calibration import read_calibration_text
from .checkpoint import TORCH_TO_ST, tensor_bytes
from .container import SpooledSafetensorsWriter, TensorSpec
from .errors import CodecError
from .format import DeltaFile
from .terms import LowRankTerm, entry_terms

LossKind = Literal["mse", "kl"]
Progress = Callable[[int, int, float], None]  # (step, total, loss)


@dataclass(frozen=True)
class DistillOptions:
    """Defaults are the paper's: 800 samples × 128 tokens, batch 4, 200 steps, lr 1e-4."""

    steps: int = 200
    batch: int = 4
    seq_len: int = 128
    samples: int = 800
    lr: float = 1e-4
    loss: LossKind = "mse"
    seed: int = 0
    offload_teacher: bool = False  # precompute teacher logits to disk, then free the teacher
    #: Project the scales onto >= 0 after every step. A mean-abs scale is <Δ, sign>/n > 0, so a
    #: sign flip never brings a matrix closer to its fine-tune: it only lets the optimizer spend
    #: one matrix to offset another's error on the calibration text (measured: it costs
    #: held-out fidelity, bench/RESULTS.md). False keeps the unconstrained recipe.
    nonnegative: bool = True

    def __post_init__(self) -> None:
        for field, value in (
            ("steps", self.steps),
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("samples", self.samples),
        ):
            if value < 1:
                raise CodecError(f"{field} must be >= 1, got {value}")
        if not self.lr > 0:
            raise CodecError(f"lr must be > 0, got {self.lr}")
        if self.loss not in ("mse", "kl"):
            raise CodecError(f"loss must be 'mse' or 'kl', got {self.loss!r}")


@dataclass
class DistillReport:
    initial_loss: float  # on the probe samples with the mean-abs scales
    final_loss: float  # on the same samples with the distilled scales
    losses: list[float]
    clamped: int  # scales the projection held at 0 when training ended (0 without it)
    seconds: float
    peak_rss_bytes: int


class SignScale(nn.Module):
    """Parametrization W = W_base + Σ_p scale_p ⊙ sign_p with only `scale` trainable."""

    def __init__(self, sign_pm1: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("sign", sign_pm1, persistent=False)  # int8 ±1, [P, out, in]
        self.scale = nn.Parameter(scale.clone().float())  # [P, 1] or [P, out]

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        delta = (self.scale.unsqueeze(-1) * self.sign).sum(0)
        return base + delta.to(base.dtype)


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # pragma: no cover - non-POSIX
        return 0


def _student(base_dir: Path, delta: DeltaFile, device: str) -> tuple[nn.Module, dict[str, SignScale]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model.requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, e in delta.entries.items():
        if e.full is not None:
            if name not in params:
                raise CodecError(f"delta tensor {name!r} is not a parameter of the base model")
            target = params[name]
            full = delta.full(name)
            if full.shape != target.shape:
                raise CodecError(
                    f"{name}: dense tensor shape {tuple(full.shape)} "
                    f"differs from the model's {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(full)
    scales: dict[str, SignScale] = {}
    from torch.nn.utils import parametrize

    for name, e in delta.entries.items():
        if e.sign is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        # A low-rank term beside the signs (hybrid) is frozen: it joins the base weight.
        for term in entry_terms(delta, name):
            if isinstance(term, LowRankTerm):
                a, b = term.factors()
                with torch.no_grad():
                    weight.add_(torch.matmul(b, a).to(device=weight.device, dtype=weight.dtype))
        signs = unpack_signs(delta.sign(name), weight.shape[-1]).to(torch.int8) * 2 - 1
        scales[name] = SignScale(signs.to(device), delta.scale(name).to(device))
        parametrize.register_parametrization(module, attr, scales[name])
    _retie_head(model, scales)
    return model, scales


def _retie_head(model: nn.Module, scales: dict[str, SignScale]) -> None:
    """A parametrized, tied input embedding no longer shares its tensor with lm_head: make the
    head read the embedding's parametrized weight so the tie survives."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not any(n.endswith("embed_tokens.weight") for n in scales):
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, emb.weight)

    head.forward = forward  # type: ignore[method-assign]


def _loss(student: torch.Tensor, teacher: torch.Tensor, kind: LossKind) -> torch.Tensor:
    if kind == "mse":
        return nn.functional.mse_loss(student, teacher)
    return nn.functional.kl_div(
        nn.functional.log_softmax(student, -1).flatten(0, -2),
        nn.functional.log_softmax(teacher, -1).flatten(0, -2),
        log_target=True,
        reduction="batchmean",
    )


def distill_scales(
    base_dir: str | os.PathLike[str],
    finetuned_dir: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    options: DistillOptions = DistillOptions(),
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> DistillReport:
    """Write `out_path`: the delta at `delta_path` with distilled scales (all else bit-identical)."""
    from transformers import AutoModelForCausalLM

    text = read_calibration_text(data)
    delta = DeltaFile.open(delta_path)
    if not any(e.sign is not None for e in delta.entries.values()):
        raise CodecError("the delta has no binarized tensors: there are no scales to distill")
    base_dir, finetuned_dir = Path(base_dir), Path(finetuned_dir)
    samples = token_samples(
        tokenizer_for(finetuned_dir, base_dir), text.documents, options.seq_len, options.samples, options.seed
    )
    torch.manual_seed(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    batches = (
        [samples[torch.randint(len(samples), (options.batch,), generator=gen)] for _ in range(options.steps)]
        if len(samples) < options.batch
        else [
            samples[(torch.arange(options.batch) + s * options.batch) % len(samples)]
            for s in range(options.steps)
        ]
    )

    start = time.perf_counter()
    teacher = AutoModelForCausalLM.from_pretrained(finetuned_dir, dtype=torch.float32).to(device).eval()
    teacher_cache = probe_teacher = None
    if options.offload_teacher:
        import tempfile

        import numpy as np

        vocab = teacher.config.vocab_size
        spool = tempfile.NamedTemporaryFile(prefix="deltastore-teacher-", suffix=".f16", delete=False)
        spool.close()
        teacher_cache = np.memmap(
            spool.name,
            dtype=np.float16,
            mode="w+",
            shape=(options.steps, options.batch, options.seq_len, vocab),
        )
        with torch.no_grad():
            for s, b in enumerate(batches):
                teacher_cache[s] = teacher(b.to(device)).logits.to(torch.float16).cpu().numpy()
            probe_teacher = teacher(samples[:8].to(device)).logits
        del teacher
        teacher = None

    student, scales = _student(base_dir, delta, device)
    # A fixed probe set (up to 8 calibration samples) measures the loss before and after.
    probe = samples[:8].to(device)
    with torch.no_grad():
        probe_target = probe_teacher if probe_teacher is not None else teacher(probe).logits

    def probe_loss() -> float:
        with torch.no_grad():
            return _loss(student(probe).logits, probe_target, options.loss).item()

    initial = probe_loss()
    params = [m.scale for m in scales.values()]
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / options.steps))
    )
    losses: list[float] = []
    try:
        for step, batch in enumerate(batches):
            batch = batch.to(device)
            with torch.no_grad():
                if teacher_cache is not None:
                    target = torch.from_numpy(teacher_cache[step]).to(device=device, dtype=torch.float32)
                else:
                    target = teacher(batch).logits
            loss = _loss(student(batch).logits, target, options.loss)
            loss.backward()
            opt.step()
            if options.nonnegative:
                with torch.no_grad():
                    for p in params:
                        p.clamp_(min=0)
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress:
                progress(step + 1, options.steps, losses[-1])
    finally:
        if teacher_cache is not None:
            name = teacher_cache.filename
            del teacher_cache
            os.unlink(name)
    final = probe_loss()
    seconds = time.perf_counter() - start
    clamped = sum(int((p == 0).sum()) for p in params) if options.nonnegative else 0

    calibration = {
        "dataset": text.source and Path(text.source).name,
        "data_fingerprint": text.fingerprint,
        "samples": len(samples),
        "initial_loss": initial,
        "final_loss": final,
        "scales_at_zero": clamped,
        **asdict(options),
        "seconds": round(seconds, 1),
    }
    _write_with_scales(
        delta,
        Path(out_path),
        {n: m.scale.detach().cpu() for n, m in scales.items()},
        calibration,
        inputs=[base_dir, finetuned_dir, delta_path, data],
    )
    return DistillReport(initial, final, losses, clamped, seconds, _peak_rss())


def _write_with_scales(
    delta: DeltaFile, out_path: Path, scales: dict[str, torch.Tensor], calibration: dict, *, inputs: list
) -> None:
    for name, s in scales.items():
        if not torch.isfinite(s).all():
            raise CodecError(f"distillation diverged: {name} has non-finite scales (lower --lr)")
    writer = SpooledSafetensorsWriter(out_path, inputs=inputs)
    try:
        for tensor_name in delta.header.tensors:  # same tensors, same order; only .scale data changes
            base_name, _, kind = tensor_name.rpartition(".")
            t = (
                scales[base_name].to(torch.float32).contiguous()
                if kind == "scale"
                else delta.tensor(tensor_name)
            )
            writer.add(TensorSpec(tensor_name, TORCH_TO_ST[t.dtype], tuple(t.shape)), tensor_bytes(t))
        metadata = dict(delta.metadata)
        metadata["calibration"] = json.dumps(calibration, sort_keys=True)
        writer.close(metadata)
    except BaseException:
        writer.abort()
        raise
