"""Fidelity of compressed deltas on a real model pair: KL to the fine-tune, top-1 agreement,
held-out loss and the share of the fine-tune's loss gain each variant keeps, on >= 300 windows.

    python -m eval.fidelity [--data-dir .data] [--windows 320] [--only bitdelta,svd] [--cached-only]

Builds (once, cached) SmolLM2-135M-Instruct and its stdlib fine-tune (eval/pair.py), compresses
it in each variant of `VARIANTS` (grouped by the ratio on the compressed tensors), scores every
variant against the fine-tune's own next-token distribution on held-out windows and prints one
markdown table. Files, the fine-tune's reference and every row's scores are cached under the
variants directory, so a rerun scores only what is new. Each variant's fidelity summary is also
written into its .bdelta (`fidelity` metadata), where `deltactl push` / `show` pick it up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from codec import codecs
from codec.activations import input_moments
from codec.checkpoint import ST_TO_TORCH, TORCH_TO_ST, Checkpoint, tensor_bytes
from codec.codecs.hybrid import HybridOptions
from codec.codecs.lowrank_mp import LowRankMPOptions
from codec.compress import BitDeltaOptions, CompressOptions, DeltaDQOptions, compress
from codec.container import SpooledSafetensorsWriter, TensorSpec
from codec.distill import DistillOptions, distill_scales
from codec.format import DTYPE_CODE, DeltaFile

from . import corpus, pair

#: How a variant uses calibration text: not at all; distil the scales (kept >= 0, or signed as
#: before that rule); or steer the codec's per-tensor choice by the fine-tune's input moments.
Calibration = Literal["none", "distill", "distill-signed", "activations"]


@dataclass(frozen=True)
class Variant:
    """One row of the table: `codec` at `ratio` (fp16 bytes / stored bytes over the compressed
    tensors; the row group), with the codec's own `options` as (name, value) pairs."""

    label: str
    codec: str  # "base", "finetuned", "svd", or a key of COMPRESS_OPTIONS
    ratio: int = 0
    options: tuple[tuple[str, object], ...] = ()
    calibration: Calibration = "none"

    @property
    def stem(self) -> str:
        """File stem of the compressed variant before any distillation (shared by the rows that
        distil the same file)."""
        opts = "".join(f"-{k}={v}" for k, v in self.options)
        steer = "-activations" if self.calibration == "activations" else ""
        return f"{self.codec}-{self.ratio}x{opts}{steer}"

    def key(self, distill: DistillOptions) -> str:
        """Cache key of the row's file and scores."""
        if self.calibration in ("distill", "distill-signed"):
            signed = "-signed" if self.calibration == "distill-signed" else ""
            return f"{self.stem}.distilled-{distill.steps}{signed}"
        return self.stem


def _bitdelta_options(ratio: int, options: dict) -> CompressOptions:
    if ratio < 1 or 16 % ratio:
        raise ValueError(f"BitDelta stores 16x / planes on fp16 weights: there is no {ratio}x")
    return CompressOptions(codec=BitDeltaOptions(planes=16 // ratio, **options))


def _deltadq_options(ratio: int, options: dict) -> CompressOptions:
    return CompressOptions(codec=DeltaDQOptions(ratio=ratio, **options))


def _lowrank_mp_options(ratio: int, options: dict) -> CompressOptions:
    return CompressOptions(codec=LowRankMPOptions(ratio=ratio, **options))


def _hybrid_options(ratio: int, options: dict) -> CompressOptions:
    return CompressOptions(codec=HybridOptions(ratio=ratio, **options))


#: The one place a variant becomes compress options: a codec that `compress` knows is one entry
#: (its target ratio and options -> CompressOptions).
COMPRESS_OPTIONS: dict[str, Callable[[int, dict], CompressOptions]] = {
    "bitdelta": _bitdelta_options,
    "deltadq": _deltadq_options,
    "lowrank-mp": _lowrank_mp_options,
    "hybrid": _hybrid_options,
}

REFERENCE_ROWS = (Variant("base", "base"), Variant("fine-tuned (fp16)", "finetuned"))

#: The table: at 16x, 1-bit BitDelta (its native size), DeltaDQ, SVD and lowrank-mp at the same
#: bytes; at 32x, where BitDelta has no variant, the others; at 8x, where hybrid lives (its sign
#: plane alone is 16x), 2-plane BitDelta, lowrank-mp and hybrid.
VARIANTS = (
    Variant("1-bit, per-matrix (mean-abs init)", "bitdelta", 16),
    Variant("1-bit, per-row", "bitdelta", 16, (("scale_mode", "per-row"),)),
    Variant("1-bit, per-matrix, distilled (scales >= 0)", "bitdelta", 16, calibration="distill"),
    Variant("1-bit, per-matrix, distilled (signed scales)", "bitdelta", 16, calibration="distill-signed"),
    Variant("DeltaDQ 16x", "deltadq", 16),
    Variant("SVD low rank 16x", "svd", 16),
    Variant("lowrank-mp 16x", "lowrank-mp", 16),
    Variant("lowrank-mp 16x, calibrated", "lowrank-mp", 16, calibration="activations"),
    Variant("DeltaDQ 32x", "deltadq", 32),
    Variant("SVD low rank 32x", "svd", 32),
    Variant("lowrank-mp 32x", "lowrank-mp", 32),
    Variant("lowrank-mp 32x, calibrated", "lowrank-mp", 32, calibration="activations"),
    Variant("2 planes, per-matrix 8x", "bitdelta", 8),
    Variant("lowrank-mp 8x", "lowrank-mp", 8),
    Variant("hybrid 8x", "hybrid", 8),
    Variant("hybrid 8x, distilled residual scales", "hybrid", 8, calibration="distill"),
)


@dataclass
class Row:
    variant: str
    bytes: int
    loss: float
    agreement: float | None = None
    kl: float = 0.0  # mean KL(fine-tune ‖ variant) per held-out token, nats
    top1: float = 1.0  # share of held-out positions where the variant's argmax is the fine-tune's
    linear_ratio: float | None = None  # fp16 bytes / delta bytes over the compressed tensors only
    group: int = 0  # the variant's nominal ratio (its row group); 0 for the reference rows
    seconds: float = 0.0  # scoring time (teacher-forced windows + greedy prompts)
    notes: str = ""


def linear_ratio(delta_path: Path, ft: Checkpoint) -> float | None:
    """fp16 bytes of the delta's compressed tensors over the bytes the delta stores for them."""
    delta = DeltaFile.open(delta_path)
    names = [n for n, e in delta.entries.items() if e.kind != "full"]
    stored = sum(delta.entries[n].nbytes for n in names)
    return sum(2 * math.prod(ft.entry(n).shape) for n in names) / stored if stored else None


def _load(model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def delta_state(base_dir: Path, delta_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor the delta sets, as `apply` reconstructs it (in the delta's dtype)."""
    delta = DeltaFile.open(delta_path)
    dtype = ST_TO_TORCH[DTYPE_CODE[delta.dtype_name]]
    base = Checkpoint.open(base_dir)
    state = {}
    for name, e in delta.entries.items():
        if e.kind == "full":
            state[name] = delta.full(name)
        else:
            state[name] = codecs.get(e.kind).reconstruct(delta, name, base.get(name), dtype)
    return state


def load_state(model, base: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    """Make `model` the base with `state`'s tensors in place of the base's (fp32)."""
    params = model.state_dict()
    with torch.no_grad():
        for name in base.names:
            params[name].copy_((state[name] if name in state else base.get(name)).to(torch.float32))


def model_with_delta(base_dir: Path, delta_path: Path):
    """The base model with the delta's reconstruction loaded (as `apply` would produce it)."""
    model = _load(base_dir)
    load_state(model, Checkpoint.open(base_dir), delta_state(base_dir, delta_path))
    return model


def compressed_names(base_dir: Path, ft_dir: Path) -> list[str]:
    """The tensors a default compress stores compressed (changed, 2-D, not embedding/head)."""
    base, ft = Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    options = CompressOptions()
    return [
        n
        for n in ft.names
        if n in base
        and ft.entry(n).shape == base.entry(n).shape
        and options.binarizes(n, ft.entry(n).shape, ft.entry(n).dtype)
        and not torch.equal(ft.get(n), base.get(n))
    ]


def lowrank_state(
    base_dir: Path, ft_dir: Path, names: list[str], ratio: int = 16, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Base + a truncated-SVD delta per tensor of `names`, its rank the largest whose fp16
    factors take at most 1/`ratio` of the tensor's fp16 bytes (the classic low-rank baseline);
    other changed tensors come from the fine-tune, as in the compressed variants.
    Returns (state, delta bytes, bytes of the factors alone)."""
    base, ft = Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    state, total, factors = {}, 0, 0
    for name in ft.names:
        if name in names:
            b, f = base.get(name).float(), ft.get(name).float()
            out, inn = b.shape
            rank = max(1, (2 * out * inn // ratio) // (2 * (out + inn)))
            u, s, vh = torch.linalg.svd(f - b, full_matrices=False)
            left = (u[:, :rank] * s[:rank]).to(dtype)
            right = vh[:rank].to(dtype)
            state[name] = (b + left.float() @ right.float()).to(ft.get(name).dtype)
            factors += 2 * rank * (out + inn)
        elif not torch.equal(ft.get(name), base.get(name)):
            state[name] = ft.get(name)
            total += ft.entry(name).nbytes
    return state, total + factors, factors


def model_with_lowrank(base_dir: Path, ft_dir: Path, names: list[str], dtype: torch.dtype = torch.float16):
    """The SVD baseline at 16x as a model. Returns (model, delta bytes)."""
    state, total, _ = lowrank_state(base_dir, ft_dir, names, 16, dtype)
    model = _load(base_dir)
    load_state(model, Checkpoint.open(base_dir), state)
    return model, total


@torch.inference_mode()
def greedy_tokens(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(
        prompts,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompts),
    )
    return out[:, prompts.shape[1] :]


def greedy_agreement(model, reference_tokens: torch.Tensor, prompts: torch.Tensor, new_tokens: int) -> float:
    """Fraction of generated positions where greedy decoding matches the fine-tune's."""
    got = greedy_tokens(model, prompts, new_tokens)
    n = min(got.shape[1], reference_tokens.shape[1])
    return float((got[:, :n] == reference_tokens[:, :n]).float().mean())


@dataclass
class Reference:
    """The fine-tune on the held-out windows: its last hidden states (its logits are
    `head` applied to them, a fifth of a forward pass) and its greedy continuations."""

    hidden: torch.Tensor  # [windows, seq_len, hidden] fp32
    head: torch.Tensor  # lm_head weight [vocab, hidden] fp32
    greedy: torch.Tensor  # [prompts, new_tokens]


@torch.inference_mode()
def last_hidden(model, windows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat(
        [model.base_model(windows[i : i + batch]).last_hidden_state for i in range(0, len(windows), batch)]
    )


@dataclass(frozen=True)
class Score:
    loss: float  # mean next-token loss
    kl: float  # mean KL(reference ‖ model) per position
    top1: float  # share of positions where both argmaxes agree


@torch.inference_mode()
def score(model, windows: torch.Tensor, reference: Reference, batch: int) -> Score:
    """Teacher-forced scores of `model` on `windows` against the reference, every position
    (`model` None: the reference's own, from its cached hidden states)."""
    loss = kl = top1 = 0.0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        ref = torch.log_softmax(
            torch.nn.functional.linear(reference.hidden[i : i + batch], reference.head), -1
        )
        if model is None:
            got = ref
        else:
            hidden = model.base_model(ids).last_hidden_state
            got = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1)
        loss -= float(got[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        kl += float((ref.exp() * (ref - got)).sum())
        top1 += float((ref.argmax(-1) == got.argmax(-1)).sum())
    positions = windows.numel()
    return Score(loss / (positions - len(windows)), kl / positions, top1 / positions)


def write_fidelity(delta_path: Path, summary: dict) -> None:
    """Rewrite `delta_path` with a `fidelity` metadata entry (tensor bytes unchanged)."""
    delta = DeltaFile.open(delta_path)
    writer = SpooledSafetensorsWriter(delta_path)
    for key in delta.header.tensors:
        t = delta.tensor(key)
        writer.add(TensorSpec(key, TORCH_TO_ST[t.dtype], tuple(t.shape)), tensor_bytes(t))
    metadata = dict(delta.metadata)
    metadata["fidelity"] = json.dumps(summary, sort_keys=True)
    writer.close(metadata)


@dataclass
class Settings:
    """What to evaluate and on how much text (defaults: the full run on SmolLM2, sized for
    the CPU: about 4 minutes of two cores per variant)."""

    variants: tuple[Variant, ...] = VARIANTS
    distill: DistillOptions = field(
        default_factory=lambda: DistillOptions(steps=32, batch=4, seq_len=128, samples=800, lr=1e-4)
    )
    windows: int = 320
    seq_len: int = 256
    batch: int = 4
    threads: int | None = (
        1  # torch threads while scoring (1: on a shared CPU, more threads spin); None leaves torch's default
    )
    prompts: int = 16
    prompt_len: int = 32
    new_tokens: int = 32
    cached_only: bool = False  # report the rows already scored (their files get their summaries)
    #: (i, n): score only the i-th of n equal slices of the windows, so n processes can share one
    #: row on a crowded machine; the row lands when its n slices have.
    shard: tuple[int, int] = (0, 1)
    score_reference: bool = True  # False: leave the base and fine-tune rows to another run


@dataclass
class Report:
    rows: list[Row]
    distill_figures: dict[str, dict]
    windows: int
    settings: Settings
    missing: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        s = self.settings
        by_label = {r.variant: r for r in self.rows}
        base, ft = by_label.get(REFERENCE_ROWS[0].label), by_label.get(REFERENCE_ROWS[1].label)
        gain = base.loss - ft.loss if base and ft else 0.0
        lines = [
            f"Held-out: {self.windows} windows × {s.seq_len} tokens ({self.windows * s.seq_len:,} "
            "positions) of stdlib sources never trained on. KL (nats per token) and top-1: "
            "against the fine-tune's next-token distribution at every position, teacher-forced; "
            f"greedy: {s.prompts} prompts × {s.new_tokens} generated tokens.",
            "",
            "| group | variant | ratio on compressed tensors (vs fp16) | KL to fine-tune | top-1 agreement "
            "| gain recovered | held-out loss | perplexity | greedy agreement | file | scored in |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            group = f"{r.group}x" if r.group else "-"
            lin = f"{r.linear_ratio:.1f}x" if r.linear_ratio else "-"
            rec = f"{100 * (base.loss - r.loss) / gain:.1f}%" if gain > 0 else "-"
            greedy = f"{100 * r.agreement:.1f}%" if r.agreement is not None else "-"
            lines.append(
                f"| {group} | {r.variant} | {lin} | {r.kl:.5f} | {100 * r.top1:.2f}% | {rec} "
                f"| {r.loss:.4f} | {math.exp(r.loss):.3f} | {greedy} | {r.bytes / 2**20:.1f} MiB "
                f"| {r.seconds:.0f} s |"
            )
        lines.append("")
        for label, f in self.distill_figures.items():
            lines.append(
                f"distillation '{label}': {f['seconds'] / 60:.1f} min, {s.distill.steps} steps, "
                f"calibration loss {f['initial_loss']:.4g} -> {f['final_loss']:.4g}, peak RSS "
                f"{f['peak_rss_bytes'] / 2**30:.2f} GiB"
            )
        for r in self.rows:
            if r.notes:
                lines.append(f"{r.variant}: {r.notes}")
        if self.missing:
            lines.append("not scored yet: " + ", ".join(self.missing))
        return "\n".join(lines)


def _scale_notes(path: Path) -> str:
    """How many scales of a distilled delta are negative or zero (a flipped or deleted delta)."""
    delta = DeltaFile.open(path)
    scales = torch.cat([delta.scale(n).flatten() for n, e in delta.entries.items() if e.scale is not None])
    return (
        f"{int((scales < 0).sum())} of {scales.numel()} scales negative, {int((scales == 0).sum())} zero, "
        f"smallest {float(scales.min()):.3g}"
    )


def _windows_id(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]


def evaluate(
    base_dir: Path,
    ft_dir: Path,
    work: Path,
    calibration: Path,
    settings: Settings = Settings(),
    log: Callable[[str], None] = print,
) -> Report:
    """Build every variant of `settings` (files cached by key under `work`), score each on the
    held-out windows against the fine-tune (scores cached beside them, keyed by the windows)
    and write each file's fidelity summary into it."""
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    tok = AutoTokenizer.from_pretrained(base_dir)
    windows = torch.tensor(corpus.heldout_windows(tok, settings.windows, settings.seq_len))
    prompts = windows[: settings.prompts, : settings.prompt_len]
    wid = _windows_id(windows)
    scores = work / f"scores-{settings.windows}x{settings.seq_len}-{wid}"  # one file a row, so
    scores.mkdir(exist_ok=True)  # runs scoring different rows side by side never clobber each other
    distill = settings.distill
    variants = REFERENCE_ROWS + tuple(settings.variants)
    # The fine-tune's own row first: it is read off the reference while the model still holds it.
    part, parts = settings.shard
    if not 0 <= part < parts:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {part}/{parts}")
    suffix = f".part{part}of{parts}" if parts > 1 else ""
    todo = sorted(
        (
            v
            for v in variants
            if not (scores / f"{v.key(distill)}.json").exists()
            and not (scores / f"{v.key(distill)}{suffix}.json").exists()
            and (settings.score_reference or v not in REFERENCE_ROWS)
        ),
        key=lambda v: v.codec != "finetuned",
    )
    if settings.cached_only:
        todo = []

    base_ckpt, ft_ckpt = Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    model = reference = None
    if todo:
        model = _load(ft_dir)
        start = time.perf_counter()
        ref_path = work / f"reference-{settings.windows}x{settings.seq_len}-{wid}.pt"
        if ref_path.exists():
            hidden, greedy = (t for t in (torch.load(ref_path)[k] for k in ("hidden", "greedy")))
        else:
            hidden = last_hidden(model, windows, settings.batch)
            greedy = greedy_tokens(model, prompts, settings.new_tokens)
            torch.save({"hidden": hidden, "greedy": greedy}, ref_path)
            log(f"# fine-tune reference on {len(windows)} windows in {time.perf_counter() - start:.0f} s")
        reference = Reference(hidden, model.get_output_embeddings().weight.detach().clone(), greedy)

    names: list[str] = []
    moments = None
    distill_figures: dict[str, dict] = {}
    for v in todo:
        key = v.key(distill)
        path = None
        notes = ""
        linear = None
        if v.codec == "base":
            state, nbytes = {}, 0
        elif v.codec == "finetuned":
            state, nbytes = None, ft_ckpt.total_bytes
        elif v.codec == "svd":
            names = names or compressed_names(base_dir, ft_dir)
            state, nbytes, factors = lowrank_state(base_dir, ft_dir, names, v.ratio)
            linear = sum(2 * math.prod(ft_ckpt.entry(n).shape) for n in names) / factors
        else:
            if v.codec not in COMPRESS_OPTIONS:
                raise ValueError(
                    f"{v.label}: unknown codec {v.codec!r} (known: {', '.join(COMPRESS_OPTIONS)})"
                )
            path = work / f"{v.stem}.bdelta"
            if not path.exists():
                if v.calibration == "activations" and moments is None:
                    moments = input_moments(
                        ft_dir,
                        calibration,
                        samples=min(distill.samples, 128),
                        seq_len=distill.seq_len,
                        seed=distill.seed,
                        base_dir=base_dir,
                    )
                compress(
                    base_dir,
                    ft_dir,
                    path,
                    COMPRESS_OPTIONS[v.codec](v.ratio, dict(v.options)),
                    input_moments=moments if v.calibration == "activations" else None,
                )
            if v.calibration in ("distill", "distill-signed"):
                path = _distilled(
                    base_dir,
                    ft_dir,
                    path,
                    work / f"{key}.bdelta",
                    calibration,
                    replace(distill, nonnegative=v.calibration == "distill"),
                )
                notes = _scale_notes(path)
            state, nbytes, linear = (
                delta_state(base_dir, path),
                path.stat().st_size,
                linear_ratio(path, ft_ckpt),
            )
        start = time.perf_counter()
        if state is not None:
            load_state(model, base_ckpt, state)
            del state
        lo, hi = part * len(windows) // parts, (part + 1) * len(windows) // parts
        s = score(
            model if v.codec != "finetuned" else None,
            windows[lo:hi],
            replace(reference, hidden=reference.hidden[lo:hi]),
            settings.batch,
        )
        agreement = (
            greedy_agreement(model, reference.greedy, prompts, settings.new_tokens) if part == 0 else None
        )
        row = {
            "label": v.label,
            "bytes": nbytes,
            "loss": s.loss,
            "kl": s.kl,
            "top1": s.top1,
            "agreement": agreement,
            "linear_ratio": linear,
            "seconds": time.perf_counter() - start,
            "notes": notes,
            "windows": hi - lo,
        }
        _write_json(scores / f"{key}{suffix}.json", row)  # each row kept as it lands
        log(f"# scored {v.label}{suffix}: KL {s.kl:.5f}, top-1 {s.top1:.4f} in {row['seconds']:.0f} s")
        slices = [scores / f"{key}.part{i}of{parts}.json" for i in range(parts)]
        if parts > 1 and all(p.exists() for p in slices):
            _write_json(scores / f"{key}.json", _merge([json.loads(p.read_text()) for p in slices]))

    cache = {p.stem: json.loads(p.read_text()) for p in scores.glob("*.json") if ".part" not in p.name}
    refs = [cache.get(r.key(distill)) for r in REFERENCE_ROWS]
    rows, missing = [], []
    for v in variants:
        key = v.key(distill)
        figures = work / f"{key}.json"
        if v.calibration in ("distill", "distill-signed") and figures.exists():
            distill_figures[v.label] = json.loads(figures.read_text())
        if key not in cache:
            missing.append(v.label)
            continue
        c = cache[key]
        if all(refs) and (work / f"{key}.bdelta").exists():
            _write_summary(work / f"{key}.bdelta", refs[0], refs[1], c)
        rows.append(
            Row(
                v.label,
                c["bytes"],
                c["loss"],
                c["agreement"],
                c["kl"],
                c["top1"],
                c["linear_ratio"],
                v.ratio,
                c["seconds"],
                c["notes"],
            )
        )
    return Report(rows, distill_figures, len(windows), settings, missing)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _merge(slices: list[dict]) -> dict:
    """One row from its slices' scores: means weighted by windows (all windows are the same
    length); greedy agreement and the row's facts from the first slice, the time summed."""
    n = sum(p["windows"] for p in slices)
    row = dict(slices[0], windows=n, seconds=sum(p["seconds"] for p in slices))
    for k in ("loss", "kl", "top1"):
        row[k] = sum(p[k] * p["windows"] for p in slices) / n
    return row


def _distilled(base_dir, ft_dir, source: Path, out: Path, calibration: Path, options: DistillOptions) -> Path:
    """`source` with distilled scales, cached as `out` with the run's figures beside it."""
    figures = out.with_suffix(".json")
    if not (out.exists() and figures.exists()):
        start = time.perf_counter()
        d = distill_scales(base_dir, ft_dir, source, out, calibration, options)
        figures.write_text(
            json.dumps(
                {
                    "seconds": time.perf_counter() - start,
                    "initial_loss": d.initial_loss,
                    "final_loss": d.final_loss,
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                }
            )
        )
    return out


def _write_summary(path: Path, base: dict, ft: dict, row: dict) -> None:
    """Write the row's fidelity summary into its file, unless it already holds this one."""
    summary = {
        "eval": "python stdlib held-out split, next-token loss",
        "loss_base": base["loss"],
        "loss_finetuned": ft["loss"],
        "loss": row["loss"],
        "gain_recovered": (base["loss"] - row["loss"]) / (base["loss"] - ft["loss"]),
        "greedy_agreement": row["agreement"],
        "kl_to_finetuned": row["kl"],
        "top1_agreement": row["top1"],
    }
    stored = DeltaFile.open(path).metadata.get("fidelity")
    if stored is None or json.loads(stored) != summary:
        write_fidelity(path, summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--windows", type=int, default=Settings.windows, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=Settings.seq_len, help="tokens per window")
    ap.add_argument("--batch", type=int, default=Settings.batch, help="windows per forward pass")
    ap.add_argument("--threads", type=int, default=Settings.threads, help="torch threads")
    ap.add_argument("--distill-steps", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=Settings.prompts)
    ap.add_argument("--new-tokens", type=int, default=Settings.new_tokens)
    ap.add_argument("--finetune-steps", type=int, default=pair.Recipe.steps, help="fine-tune recipe")
    ap.add_argument("--finetune-batch", type=int, default=pair.Recipe.batch)
    ap.add_argument("--finetune-seq-len", type=int, default=pair.Recipe.seq_len)
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated codec names or row keys (e.g. bitdelta-16x, deltadq-32x) to evaluate; "
        "the reference rows always",
    )
    ap.add_argument("--cached-only", action="store_true", help="print the rows already scored")
    ap.add_argument("--shard", default="0/1", help="i/n: score the i-th of n slices of the windows")
    ap.add_argument(
        "--skip-reference", action="store_true", help="leave the base/fine-tune rows to another run"
    )
    args = ap.parse_args()

    root = args.data_dir / "pair"
    recipe = pair.Recipe(steps=args.finetune_steps, batch=args.finetune_batch, seq_len=args.finetune_seq_len)
    t0 = time.perf_counter()
    base_dir = pair.build_base(root / "base")
    ft_dir = pair.finetune(
        base_dir, root / f"finetuned-{recipe.steps}x{recipe.batch}x{recipe.seq_len}", recipe
    )
    print(f"# pair ready in {time.perf_counter() - t0:.0f}s: {ft_dir}")
    calibration = root / "calibration.txt"
    if not calibration.exists():
        calibration.write_text("\n\n".join(corpus.texts("train")[::7]))
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    distill = DistillOptions(steps=args.distill_steps, batch=4, seq_len=128, samples=800, lr=1e-4)
    variants = tuple(v for v in VARIANTS if not wanted or v.codec in wanted or v.key(distill) in wanted)
    settings = Settings(
        variants=variants,
        distill=distill,
        windows=args.windows,
        seq_len=args.seq_len,
        batch=args.batch,
        threads=args.threads,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        cached_only=args.cached_only,
        shard=tuple(int(x) for x in args.shard.split("/")),
        score_reference=not args.skip_reference,
    )
    report = evaluate(base_dir, ft_dir, root / f"variants-{ft_dir.name}", calibration, settings)
    print()
    print(report.markdown())


if __name__ == "__main__":
    main()
