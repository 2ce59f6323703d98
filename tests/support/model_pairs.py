"""Build small real HF Llama base/fine-tune pairs on disk for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(tied: bool = False, vocab: int = 384, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 8 * 8 + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )


def make_llama_pair(
    root: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    tied: bool = False,
    delta_std: float = 0.02,
    hidden: int = 64,
    layers: int = 2,
) -> tuple[Path, Path]:
    """Save a random tiny Llama as `root/base` and a perturbed copy as `root/finetuned`.

    The fine-tune adds Gaussian noise (std `delta_std` relative to each weight's std) to every
    parameter, so every tensor kind (linears, norms, embeddings) changes.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tied=tied, hidden=hidden, layers=layers)).to(
        getattr(torch, dtype)
    )
    base_dir, ft_dir = root / "base", root / "finetuned"
    model.save_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            noise = (
                torch.randn(p.shape, generator=gen) * delta_std * (p.float().std() if p.numel() > 1 else 1.0)
            )
            p.add_(noise.to(p.dtype) + (0.01 if p.dim() == 1 else 0.0))
    model.save_pretrained(ft_dir)
    return base_dir, ft_dir


def save_byte_tokenizer(model_dir: Path) -> None:
    """A byte-level tokenizer (ids 0..255, EOS 256) so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(model_dir)
