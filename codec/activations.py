"""Input statistics of a model's linear layers on calibration text.

DeltaDQ chooses each tensor's group size (and bits/keep split) by the error its dropout and
quantization cause in the layer's *output*, `x·(Δ − Δ̂)ᵀ`, on real inputs x. For inputs whose
channels are uncorrelated that error is `Σ_o Σ_i E[x_i²] (Δ − Δ̂)_{o,i}²`: the squared weight
error weighted by each input channel's second moment. This module measures E[x_i²] for every
`nn.Linear` of the fine-tuned model on calibration text (forward pre-hooks, one pass, fp32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .calibration import read_calibration_text
from .errors import CalibrationDataError, CodecError


@dataclass(frozen=True)
class InputMoments:
    """E[x²] per input channel of each linear layer, keyed by its weight's tensor name."""

    moments: dict[str, torch.Tensor]
    tokens: int
    data_fingerprint: str

    def weight_for(self, name: str, in_features: int) -> torch.Tensor | None:
        w = self.moments.get(name)
        if w is None:
            return None
        if w.shape != (in_features,):
            raise CodecError(
                f"{name}: calibration moments have shape "
                f"{tuple(w.shape)}, the tensor has {in_features} inputs"
            )
        return w


def tokenizer_for(finetuned_dir: Path, base_dir: Path | None = None):
    """The fine-tune's tokenizer, or the base's when the fine-tune ships none."""
    from transformers import AutoTokenizer

    candidates = [finetuned_dir] + ([base_dir] if base_dir is not None else [])
    d = next(
        (c for c in candidates if (c / "tokenizer_config.json").exists() or (c / "tokenizer.json").exists()),
        candidates[-1],
    )
    try:
        return AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"no tokenizer next to the fine-tune or the base ({exc})") from None


def token_samples(tokenizer, docs: list[str], seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """Up to `samples` blocks of `seq_len` tokens from `docs` (EOS-separated), shuffled by `seed`."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= seq_len * samples * 2:
            break
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise CalibrationDataError(
            f"calibration data has {len(ids)} tokens, fewer than one {seq_len}-token sample"
        )
    data = torch.tensor(ids[: blocks * seq_len]).view(blocks, seq_len)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))
    return data[order[: min(samples, blocks)]]


@torch.no_grad()
def input_moments(
    model_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    samples: int = 64,
    seq_len: int = 128,
    batch: int = 4,
    seed: int = 0,
    device: str = "cpu",
    base_dir: str | os.PathLike[str] | None = None,
) -> InputMoments:
    """Mean x² per input channel of every linear layer of the model at `model_dir`."""
    from transformers import AutoModelForCausalLM

    text = read_calibration_text(data)
    model_dir = Path(model_dir)
    tokens = token_samples(
        tokenizer_for(model_dir, Path(base_dir) if base_dir else None), text.documents, seq_len, samples, seed
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(f"{n}.weight" if n else "weight"))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        for i in range(0, len(tokens), batch):
            model(tokens[i : i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
    moments = {name: (s / counts[name]).cpu() for name, s in sums.items()}
    return InputMoments(moments, int(tokens.numel()), text.fingerprint)
