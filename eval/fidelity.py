"""Fidelity of compressed deltas on a real model pair: held-out loss, perplexity, the share of
the fine-tune's loss gain each variant keeps, and greedy-decoding agreement.

    python -m eval.fidelity [--data-dir .data] [--distill-steps 200] [--quick]

Builds (once, cached) SmolLM2-135M-Instruct and its stdlib fine-tune (eval/pair.py), compresses
it in several ways, and prints one markdown table. Each variant's fidelity summary is written
into its .bdelta (`fidelity` metadata), where `deltactl push` / `show` pick it up.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codec import codecs
from codec.activations import input_moments
from codec.checkpoint import ST_TO_TORCH, TORCH_TO_ST, Checkpoint, tensor_bytes
from codec.compress import BitDeltaOptions, CompressOptions, DeltaDQOptions, compress
from codec.container import SpooledSafetensorsWriter, TensorSpec
from codec.distill import DistillOptions, distill_scales
from codec.format import DTYPE_CODE, DeltaFile

from . import corpus, pair


@dataclass
class Row:
    variant: str
    bytes: int
    loss: float
    agreement: float | None = None
    kl: float = 0.0  # mean KL(fine-tune ‖ variant) per held-out token, nats
    top1: float = 1.0  # share of held-out positions where the variant's argmax is the fine-tune's
    linear_ratio: float | None = None  # fine-tune bytes / delta bytes over the compressed tensors only


def linear_ratio(delta_path: Path, ft: Checkpoint) -> float | None:
    delta = DeltaFile.open(delta_path)
    names = [n for n, e in delta.entries.items() if e.kind != "full"]
    stored = sum(delta.entries[n].nbytes for n in names)
    return sum(ft.entry(n).nbytes for n in names) / stored if stored else None


def _load(model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def model_with_delta(base_dir: Path, delta_path: Path):
    """The base model with the delta's reconstruction loaded (as `apply` would produce it)."""
    model = _load(base_dir)
    delta = DeltaFile.open(delta_path)
    dtype = ST_TO_TORCH[DTYPE_CODE[delta.dtype_name]]
    base = Checkpoint.open(base_dir)
    state = model.state_dict()
    with torch.no_grad():
        for name, e in delta.entries.items():
            if e.kind == "full":
                value = delta.full(name)
            else:
                value = codecs.get(e.kind).reconstruct(delta, name, base.get(name), dtype)
            state[name].copy_(value.to(torch.float32))
    return model


def model_with_lowrank(base_dir: Path, ft_dir: Path, names: list[str], dtype: torch.dtype = torch.float16):
    """Base + a truncated-SVD delta per binarized matrix, rank chosen so its fp16 factors take
    no more bytes than the 1-bit signs + scale (the classic low-rank alternative). Dense
    tensors come from the fine-tune, as in the 1-bit variants. Returns (model, delta bytes)."""
    model = _load(base_dir)
    base, ft = Checkpoint.open(base_dir), Checkpoint.open(ft_dir)
    state = model.state_dict()
    total = 0
    with torch.no_grad():
        for name in ft.names:
            if name in names:
                b, f = base.get(name).float(), ft.get(name).float()
                out, inn = b.shape
                budget = out * ((inn + 7) // 8) + 4
                rank = max(1, budget // (2 * (out + inn)))
                u, s, vh = torch.linalg.svd(f - b, full_matrices=False)
                left = (u[:, :rank] * s[:rank]).to(dtype)
                right = vh[:rank].to(dtype)
                state[name].copy_((b + left.float() @ right.float()).to(ft.get(name).dtype).float())
                total += 2 * rank * (out + inn)
            elif not torch.equal(ft.get(name), base.get(name)):
                state[name].copy_(ft.get(name).float())
                total += ft.entry(name).nbytes
    return model, total


@torch.no_grad()
def greedy_agreement(model, reference_tokens: torch.Tensor, prompts: torch.Tensor, new_tokens: int) -> float:
    """Fraction of generated positions where greedy decoding matches the fine-tune's."""
    out = model.generate(
        prompts,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompts),
    )
    got = out[:, prompts.shape[1] :]
    n = min(got.shape[1], reference_tokens.shape[1])
    return float((got[:, :n] == reference_tokens[:, :n]).float().mean())


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
    """What to evaluate and on how much text (defaults: the full run on SmolLM2)."""

    only: str = "all"  # "all", "bitdelta" or "deltadq"
    distill: DistillOptions = field(
        default_factory=lambda: DistillOptions(steps=200, batch=4, seq_len=128, samples=800, lr=1e-4)
    )
    heldout_blocks: int = 32
    seq_len: int = 256
    prompts: int = 16
    prompt_len: int = 32
    new_tokens: int = 32
    ratios: tuple[int, ...] = (16, 32, 64, 128)


@dataclass
class Report:
    rows: list[Row]
    distill_figures: dict[str, dict]
    heldout_blocks: int
    settings: Settings

    def markdown(self) -> str:
        s = self.settings
        base, ft = self.rows[0], self.rows[1]
        ft_bytes, gain = ft.bytes, base.loss - ft.loss
        lines = [
            f"Held-out: {self.heldout_blocks} blocks × {s.seq_len} "
            "tokens of stdlib sources never trained on. KL and "
            "top-1: against the fine-tune's next-token distribution "
            "at every held-out position; greedy agreement: "
            f"{s.prompts} prompts × {s.new_tokens} generated tokens.",
            "",
            "| variant | size | ratio vs fp16 fine-tune | ratio "
            "on compressed tensors | held-out loss | perplexity "
            "| gain recovered | KL to fine-tune | top-1 agreement | greedy agreement |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ratio = f"{ft_bytes / r.bytes:.2f}x" if r.bytes else "-"
            rec = f"{100 * (base.loss - r.loss) / gain:.1f}%" if gain > 0 else "-"
            lin = f"{r.linear_ratio:.1f}x" if r.linear_ratio else "-"
            lines.append(
                f"| {r.variant} | {r.bytes / 2**20:.1f} MiB | {ratio} "
                f"| {lin} | {r.loss:.4f} | {math.exp(r.loss):.3f} "
                f"| {rec} | {r.kl:.4f} | {100 * r.top1:.1f}% | {100 * r.agreement:.1f}% |"
            )
        lines.append("")
        for label, f in self.distill_figures.items():
            lines.append(
                f"distillation '{label}': {f['seconds'] / 60:.1f} "
                f"min, {s.distill.steps} steps, calibration loss "
                f"{f['initial_loss']:.4g} -> {f['final_loss']:.4g}, "
                "peak RSS of the evaluation process so far "
                f"{f['peak_rss_bytes'] / 2**30:.2f} GiB"
            )
        return "\n".join(lines)


def variants_for(settings: Settings) -> list[tuple[str, CompressOptions, bool | str]]:
    """(label, options, calibration use: False, True = distil the scales, "search" = DeltaDQ's
    per-tensor search weighted by the fine-tune's activations on the calibration text)."""
    bitdelta = [
        ("1-bit, per-matrix (mean-abs init)", CompressOptions(), False),
        ("1-bit, per-row", CompressOptions(codec=BitDeltaOptions(scale_mode="per-row")), False),
        ("1-bit, per-matrix, distilled", CompressOptions(), True),
        ("2 planes, per-matrix", CompressOptions(codec=BitDeltaOptions(planes=2)), False),
        ("2 planes, per-matrix, distilled", CompressOptions(codec=BitDeltaOptions(planes=2)), True),
        ("1-bit, embeddings binarized too", CompressOptions(include=("*embed_tokens*",)), False),
    ]
    dq = [
        (f"DeltaDQ {r}x (auto)", CompressOptions(codec=DeltaDQOptions(ratio=r)), False)
        for r in settings.ratios
    ]
    dq += [
        (f"DeltaDQ {r}x (calibrated search)", CompressOptions(codec=DeltaDQOptions(ratio=r)), "search")
        for r in settings.ratios
    ]
    return {"all": bitdelta + dq, "bitdelta": bitdelta, "deltadq": [bitdelta[0]] + dq}[settings.only]


def evaluate(
    base_dir: Path, ft_dir: Path, work: Path, calibration: Path, settings: Settings = Settings()
) -> Report:
    """Compress `ft_dir` against `base_dir` in every variant (cached by name under `work`), score
    each on the held-out split and write its fidelity summary into its file."""
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(base_dir)
    heldout = torch.tensor(
        corpus.token_blocks(tok, corpus.texts("heldout"), settings.seq_len, limit=settings.heldout_blocks)
    )
    prompts = heldout[: settings.prompts, : settings.prompt_len]
    base_model, ft_model = _load(base_dir), _load(ft_dir)

    chunks = [heldout[i : i + 4] for i in range(0, len(heldout), 4)]
    with torch.no_grad():  # the fine-tune's next-token log-probabilities, once for every row (fp32)
        ref_logprobs = [torch.log_softmax(ft_model(chunk).logits.float(), -1) for chunk in chunks]

    def score(model) -> tuple[float, float, float]:
        """(held-out loss, mean KL(fine-tune ‖ model) per token, top-1 agreement with the fine-tune)."""
        loss = kl = top1 = 0.0
        with torch.no_grad():
            for chunk, ref in zip(chunks, ref_logprobs, strict=True):
                out = model(chunk, labels=chunk)
                loss += out.loss.item() * len(chunk)
                got = torch.log_softmax(out.logits.float(), -1)
                kl += float((ref.exp() * (ref - got)).sum(-1).mean()) * len(chunk)
                top1 += float((ref.argmax(-1) == got.argmax(-1)).float().mean()) * len(chunk)
        return loss / len(heldout), kl / len(heldout), top1 / len(heldout)

    def row(label: str, nbytes: int, model, **extra) -> Row:
        loss, kl, top1 = score(model)
        return Row(
            label,
            nbytes,
            loss,
            greedy_agreement(model, ref_tokens, prompts, settings.new_tokens),
            kl,
            top1,
            **extra,
        )

    ref_tokens = ft_model.generate(
        prompts,
        max_new_tokens=settings.new_tokens,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompts),
    )[:, prompts.shape[1] :]
    ft_ckpt = Checkpoint.open(ft_dir)
    ft_bytes = ft_ckpt.total_bytes
    rows = [row("base", 0, base_model), row("fine-tuned (fp16)", ft_bytes, ft_model)]
    del ft_model  # every later row compares against ref_logprobs and ref_tokens
    loss_base, loss_ft = rows[0].loss, rows[1].loss
    del base_model

    calib, distill = calibration, settings.distill
    variants = variants_for(settings)
    distill_figures = {}
    binarized_names: list[str] = []
    moments = None
    for label, options, distilled in variants:
        slug = label.replace(" ", "").replace(",", "-").replace("(", "").replace(")", "")
        path = work / f"{slug}.bdelta"
        if not path.exists():  # variants are cached by name: delete the directory to redo them
            if distilled == "search" and moments is None:
                moments = input_moments(
                    ft_dir,
                    calib,
                    samples=min(distill.samples, 128),
                    seq_len=distill.seq_len,
                    seed=distill.seed,
                    base_dir=base_dir,
                )
            compress(
                base_dir, ft_dir, path, options, input_moments=moments if distilled == "search" else None
            )
        if not binarized_names and not options.include:
            binarized_names = [n for n, e in DeltaFile.open(path).entries.items() if e.kind != "full"]
        if distilled is True:  # cached by step count, with the run's figures beside it
            out = work / f"{slug}.distilled-{distill.steps}.bdelta"
            figures = out.with_suffix(".json")
            if not (out.exists() and figures.exists()):
                start = time.perf_counter()
                d = distill_scales(base_dir, ft_dir, path, out, calib, distill)
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
            distill_figures[label] = json.loads(figures.read_text())
            path = out
        model = model_with_delta(base_dir, path)
        r = row(label, path.stat().st_size, model, linear_ratio=linear_ratio(path, ft_ckpt))
        rows.append(r)
        write_fidelity(
            path,
            {
                "eval": "python stdlib held-out split, next-token loss",
                "loss_base": loss_base,
                "loss_finetuned": loss_ft,
                "loss": r.loss,
                "gain_recovered": (loss_base - r.loss) / (loss_base - loss_ft),
                "greedy_agreement": r.agreement,
                "kl_to_finetuned": r.kl,
                "top1_agreement": r.top1,
            },
        )
        del model
    if settings.only in ("all", "bitdelta"):
        model, lr_bytes = model_with_lowrank(base_dir, ft_dir, binarized_names)
        rows.append(row("SVD low-rank delta, same bytes as 1-bit", lr_bytes, model))

    return Report(rows, distill_figures, len(heldout), settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path(".data"))
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--heldout-blocks", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny recipe for a smoke run")
    ap.add_argument(
        "--only",
        choices=("all", "bitdelta", "deltadq"),
        default="all",
        help="which variant family to evaluate (the pair and reference rows always)",
    )
    args = ap.parse_args()

    root = args.data_dir / "pair"
    recipe = pair.Recipe(steps=4, batch=2, seq_len=64) if args.quick else pair.Recipe()
    t0 = time.perf_counter()
    base_dir = pair.build_base(root / "base")
    ft_dir = pair.finetune(base_dir, root / ("finetuned-quick" if args.quick else "finetuned"), recipe)
    print(f"# pair ready in {time.perf_counter() - t0:.0f}s: {ft_dir}")
    calibration = root / "calibration.txt"
    if not calibration.exists():
        calibration.write_text("\n\n".join(corpus.texts("train")[::7]))
    settings = Settings(
        only=args.only,
        heldout_blocks=args.heldout_blocks,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        distill=DistillOptions(steps=args.distill_steps, batch=4, seq_len=128, samples=800, lr=1e-4),
    )
    work = root / ("variants-quick" if args.quick else "variants")  # cached by variant name, shared by --only
    report = evaluate(base_dir, ft_dir, work, calibration, settings)
    print()
    print(report.markdown())


if __name__ == "__main__":
    main()
