"""Fixtures for the GPU loader tests: a tiny real Llama base, fine-tunes of it compressed to
deltas with different options, and the reconstructed models (`codec.apply.apply_delta`) that
serve as the oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from codec.apply import apply_delta
from codec.compress import BitDeltaOptions, CompressOptions, DeltaDQOptions, compress
from gpu_loader import DeltaModel
from gpu_loader.sgmv import triton_available
from tests.support.model_pairs import make_llama_pair

VOCAB = 384

#: logits tolerance of `dm(...)` against the reconstructed model, per activation dtype
#: (the delta is added to the base GEMM output instead of to the weights, so only rounding differs).
LOGIT_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def perturb(src: Path, dst: Path, seed: int, std: float = 0.02) -> Path:
    """Another fine-tune of the model in `src`: every parameter gets its own Gaussian noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * std * (p.float().std() if p.numel() > 1 else 1.0)
            p.add_(noise.to(p.dtype) - (0.01 if p.dim() == 1 else 0.0))
    model.save_pretrained(dst)
    return dst


@dataclass
class Family:
    """A base, deltas of fine-tunes of it (by name), and each delta's reconstructed model dir."""

    root: Path
    base: Path
    deltas: dict[str, Path] = field(default_factory=dict)
    applied: dict[str, Path] = field(default_factory=dict)

    def model(self, name: str):
        from transformers import AutoModelForCausalLM

        path = self.base if name == "base" else self.applied[name]
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()

    def reference_logits(self, names: list[str], ids: torch.Tensor, **kw) -> list[torch.Tensor]:
        out = []
        for i, name in enumerate(names):
            with torch.no_grad():
                out.append(
                    self.model(name)(ids[i : i + 1], **{k: v[i : i + 1] for k, v in kw.items()}).logits[0]
                )
        return out


def _family(root: Path, base: Path, specs: dict[str, tuple[Path, CompressOptions]]) -> Family:
    fam = Family(root, base)
    for name, (ft, opts) in specs.items():
        fam.deltas[name] = compress(base, ft, root / f"{name}.bdelta", opts).path
        fam.applied[name] = apply_delta(base, fam.deltas[name], root / f"{name}-model").out_dir
    return fam


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    """fp32 Llama, untied. Deltas:
    a: 2 planes, per-row scales, embeddings binarized (lm_head kept dense);
    b: another fine-tune, 1 plane, per-matrix scales, embeddings and lm_head kept dense;
    c: fine-tune b with the embeddings and lm_head binarized too (lm_head through the kernel);
    d: a third fine-tune, default options."""
    root = tmp_path_factory.mktemp("family")
    base, ft1 = make_llama_pair(root, seed=0)
    ft2 = perturb(base, root / "ft2", seed=11)
    ft3 = perturb(base, root / "ft3", seed=12)
    return _family(
        root,
        base,
        {
            "a": (
                ft1,
                CompressOptions(
                    codec=BitDeltaOptions(planes=2, scale_mode="per-row"), include=("*embed_tokens*",)
                ),
            ),
            "b": (ft2, CompressOptions()),
            "c": (
                ft2,
                CompressOptions(
                    codec=BitDeltaOptions(scale_mode="per-row"), include=("*embed_tokens*", "*lm_head*")
                ),
            ),
            "d": (ft3, CompressOptions()),
        },
    )


#: DeltaDQ with 1-bit codes, half of each group kept (the 32x budget of a wide model; these
#: 64-wide tensors are too narrow for --ratio 32 once the per-row step is counted), group size searched.
DQ_1BIT_HALF = CompressOptions(codec=DeltaDQOptions(bits=1, keep=0.5))
#: DeltaDQ with 3-bit codes in 3 parts (codes straddle bytes), groups of 32 (a partial last group
#: in the 184-wide down_proj), embeddings and lm_head compressed too.
DQ_3BIT = CompressOptions(
    codec=DeltaDQOptions(bits=3, keep=0.25, group_size=32, parts=3, seed=2**63 + 12345),
    include=("*embed_tokens*", "*lm_head*"),
)


@pytest.fixture(scope="session")
def dq_family(family) -> Family:
    """`family` plus DeltaDQ deltas of its fine-tunes, so one batch can mix both codecs:
    q: fine-tune 3 at ratio 32 (embeddings and lm_head kept dense);
    r: fine-tune 1 with 3-bit codes, embeddings and lm_head compressed too."""
    root = family.root
    fam = _family(root, family.base, {"q": (root / "ft3", DQ_1BIT_HALF), "r": (root / "finetuned", DQ_3BIT)})
    fam.deltas = {**family.deltas, **fam.deltas}
    fam.applied = {**family.applied, **fam.applied}
    return fam


@pytest.fixture(scope="session")
def tied_family(llama_pair_fp16_tied, tmp_path_factory) -> Family:
    """fp16 Llama with tied embeddings: a binarizes the (shared) embedding, b keeps it dense."""
    base, ft = llama_pair_fp16_tied
    root = tmp_path_factory.mktemp("tied_family")
    ft2 = perturb(base, root / "ft2", seed=21)
    return _family(
        root,
        base,
        {
            "a": (
                ft,
                CompressOptions(
                    codec=BitDeltaOptions(planes=2, scale_mode="per-row"), include=("*embed_tokens*",)
                ),
            ),
            "b": (ft2, CompressOptions()),
        },
    )


@pytest.fixture(scope="session")
def tied_dq_family(tied_family, llama_pair_fp16_tied) -> Family:
    """`tied_family` (fp16, tied embeddings) plus q: fine-tune 1 as DeltaDQ with the shared
    embedding compressed, so the DeltaDQ embedding delta reaches the logits through lm_head."""
    root = tied_family.root
    opts = CompressOptions(
        codec=DeltaDQOptions(bits=2, keep=0.25, group_size=16), include=("*embed_tokens*",)
    )
    fam = _family(root, tied_family.base, {"q": (llama_pair_fp16_tied[1], opts)})
    fam.deltas = {**tied_family.deltas, **fam.deltas}
    fam.applied = {**tied_family.applied, **fam.applied}
    return fam


@pytest.fixture(scope="session")
def foreign_delta(tmp_path_factory) -> Path:
    """A delta made against a different base (other random init) of the same architecture."""
    root = tmp_path_factory.mktemp("foreign")
    base, ft = make_llama_pair(root, seed=7)
    return compress(base, ft, root / "foreign.bdelta", CompressOptions()).path


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory) -> Family:
    """A tiny Qwen2 (q/k/v projections with biases): the delta replaces the biases per slot."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(3)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(root / "base")
    ft = perturb(root / "base", root / "ft", seed=31)
    return _family(
        root, root / "base", {"a": (ft, CompressOptions(codec=BitDeltaOptions(scale_mode="per-row")))}
    )


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))


#: Backends every end-to-end test runs on (the Triton one interpreted on CPU).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def make_dm(family, **kw) -> DeltaModel:
    if kw.get("backend") == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    kw.setdefault("max_slots", 4)
    kw.setdefault("memory_budget", "64MiB")
    kw.setdefault("max_planes", 2)
    kw.setdefault("backend", "torch")
    return DeltaModel.from_pretrained(family.base, device="cpu", **kw)


def assert_rows_match(logits, refs, dtype, mask=None):
    for row, ref in enumerate(refs):
        got = logits[row] if mask is None else logits[row][mask[row].bool()]
        want = ref if mask is None else ref[mask[row].bool()]
        # assert_close calls msg before it returns, so the lambda sees this iteration's row
        torch.testing.assert_close(
            got.float(),
            want.float(),
            rtol=0,
            atol=LOGIT_ATOL[dtype],
            msg=lambda m: f"row {row}: {m}",  # noqa: B023
        )


def bits(state: dict) -> dict:
    return {k: v.detach().clone().contiguous().view(torch.uint8) for k, v in state.items()}
