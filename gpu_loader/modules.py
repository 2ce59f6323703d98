"""Delta-aware replacements for the modules of a causal LM, and the patcher that swaps them in.

Each replacement keeps the base module's parameters (same objects, same names, so the state
dict is the base's) and reads the slot pool's buffers, which it registers as non-persistent
buffers; with no active `SlotBatch` it computes exactly what the original module computes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .deltadq import DQWeight
from .layout import unpack_words_pm1
from .pool_layout import PoolLayout
from .segments import SlotBatch, active_batch
from .sgmv import sgmv_sign
from .sgmv_lowrank import sgmv_lowrank
from .sgmv_reference import lowrank_add_
from .sign_cpu import reconstruct_words, sign_delta_add_
from .slot_pool import SlotPool

#: Torch path: a slot with at most this many tokens in a layer adds `x·Δ̂ᵀ` by table look-up onto
#: the base GEMM; above it, the slot's weight is rebuilt and its tokens run their own GEMM.
LUT_MAX_TOKENS = 8
REBUILD_BLOCK = 1 << 18  # elements per row block when rebuilding a slot's weight


def add_dq_matmul_(
    y: torch.Tensor,
    x: torch.Tensor,
    tokens: torch.Tensor,
    weight: DQWeight,
    *,
    in_activation_dtype: bool | None = None,
) -> None:
    """Decode-then-GEMM for one DeltaDQ slot: `y[tokens] += x[tokens]·Δ̂ᵀ`, with Δ̂ decoded densely
    for this call only. On CPU, or with fp32 activations, Δ̂ stays fp32 and the product is added
    in fp32 before one rounding to y's dtype; on CUDA with fp16/bf16 activations
    (`in_activation_dtype`, default: exactly then) Δ̂ is decoded in that dtype so the GEMM runs on
    the tensor cores, and the product is added in fp32."""
    xs = x[tokens]
    if in_activation_dtype is None:
        in_activation_dtype = x.device.type == "cuda" and x.dtype != torch.float32
    if in_activation_dtype:
        prod = F.linear(xs, weight.decode(dtype=x.dtype)).float()
    else:
        prod = xs.float() @ weight.decode().T
    y[tokens] = (y[tokens].float() + prod).to(y.dtype)


def _check_rows(batch: SlotBatch, x: torch.Tensor, who: str) -> None:
    if x.dim() < 2 or x.shape[0] != batch.rows:
        raise RuntimeError(
            f"{who}: input of shape {tuple(x.shape)} does not lead with the batch dimension "
            f"({batch.rows} rows); the loader needs activations shaped [batch, ...]"
        )


class DeltaLinear(nn.Module):
    """A linear layer whose rows each use their slot's version of the weight and bias.

    Triton backend: `y = x·W_baseᵀ` for the whole batch in one GEMM, then the SGMV kernel adds
    every row's sign delta; dense replacements (`.full`) and per-slot biases are applied row-wise.
    Torch backend (CPU): slots with few tokens (decode) get `x·Δ̂ᵀ` added onto the base GEMM by
    table look-up (`sign_cpu.sign_delta_add_`, every such slot of the layer in one call); a slot
    with many tokens (prefill) has its weight rebuilt exactly as the format defines it,
    `(W_base.float() + Δ̂).to(dtype)`, and its tokens run one GEMM with it, so the GEMM work
    equals that of separate models.
    DeltaDQ slots, either backend: decode-then-GEMM on top of the base GEMM (`add_dq_matmul_`).
    Low-rank terms (alone, or beside sign planes of the residual), added last: the shrink/expand
    kernel pair for every such slot of the layer at once (Triton), or two skinny GEMMs per slot
    (torch, `sgmv_reference.lowrank_add_`).
    """

    def __init__(self, linear: nn.Linear, weight_key: str, bias_key: str | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.weight_key, self.bias_key = weight_key, bias_key
        self.backend = "auto"

    def attach(self, pool: SlotPool, backend: str) -> None:
        self.register_buffer("sign_words", pool.words[self.weight_key], persistent=False)
        self.register_buffer("sign_scales", pool.scales[self.weight_key], persistent=False)
        self.register_buffer("slot_active", pool.active[self.weight_key], persistent=False)
        if self.bias_key is not None:
            self.register_buffer("slot_bias", pool.tables[self.bias_key], persistent=False)
        if self.weight_key in pool.lowrank_a:
            self.register_buffer("lowrank_a", pool.lowrank_a[self.weight_key], persistent=False)
            self.register_buffer("lowrank_b", pool.lowrank_b[self.weight_key], persistent=False)
            self.register_buffer("lowrank_ranks", pool.lowrank_ranks[self.weight_key], persistent=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = active_batch()
        if batch is None:
            return F.linear(x, self.weight, self.bias)
        _check_rows(batch, x, f"DeltaLinear({self.weight_key})")
        x2 = x.reshape(-1, self.in_features)
        seg = batch.segments(x2.shape[0] // batch.rows)
        if self.backend == "torch":
            return self._grouped(x2, batch, seg).view(*x.shape[:-1], self.out_features)
        bias_slots = batch.with_table(self.bias_key) if self.bias_key is not None else []
        if bias_slots:
            y = F.linear(x2, self.weight)
            has = (seg.token_slots >= 0).unsqueeze(1)
            y += torch.where(has, self.slot_bias[seg.token_slots.clamp(min=0)], self.bias)
        else:
            y = F.linear(x2, self.weight, self.bias)
        sign_slots = batch.with_sign(self.weight_key)
        if sign_slots:
            sgmv_sign(
                x2,
                y,
                self.sign_words,
                self.sign_scales,
                self.slot_active,
                seg,
                backend=self.backend,
                slots=sign_slots,
            )
        for s in batch.with_dense(self.weight_key):
            tok = seg.slot_tokens[s]
            bias = self.slot_bias[s] if self.bias_key is not None else None
            y[tok] = F.linear(x2[tok], batch.views[s].dense[self.weight_key], bias)
        for s in batch.with_dq(self.weight_key):
            add_dq_matmul_(y, x2, seg.slot_tokens[s], batch.views[s].dq[self.weight_key])
        lowrank_slots = batch.with_lowrank(self.weight_key)
        if lowrank_slots:
            sgmv_lowrank(
                x2,
                y,
                self.lowrank_a,
                self.lowrank_b,
                self.lowrank_ranks,
                seg,
                backend=self.backend,
                slots=lowrank_slots,
            )
        return y.view(*x.shape[:-1], self.out_features)

    def _grouped(self, x2: torch.Tensor, batch: SlotBatch, seg) -> torch.Tensor:
        sign = set(batch.with_sign(self.weight_key))
        dense = set(batch.with_dense(self.weight_key))
        bias = set(batch.with_table(self.bias_key)) if self.bias_key is not None else set()
        lut = sorted(s for s in sign - bias if seg.slot_tokens[s].numel() <= LUT_MAX_TOKENS)
        own = sorted((sign | dense | bias) - set(lut))  # slots that run a GEMM of their own
        y = None
        if not own:  # decode: every token starts from the base GEMM
            y = F.linear(x2, self.weight, self.bias)
        else:
            in_base = ~torch.isin(seg.token_slots, torch.tensor(own, dtype=torch.int64, device=x2.device))
            if bool(in_base.all()):
                y = F.linear(x2, self.weight, self.bias)
            elif bool(in_base.any()):
                rows = in_base.nonzero().squeeze(1)
                y = x2.new_empty(x2.shape[0], self.out_features)
                y[rows] = F.linear(x2[rows], self.weight, self.bias)
        for s in own:  # DeltaDQ slots with their own bias are here too, with the base weight
            if s in sign:
                weight = self.slot_weight(s, batch.views[s].planes)
            elif s in dense:
                weight = batch.views[s].dense[self.weight_key]
            else:
                weight = self.weight
            b = self.slot_bias[s] if self.bias_key is not None else None
            tok = seg.slot_tokens[s]
            if y is None and tok.numel() == x2.shape[0]:  # one version of the layer for every token
                y = F.linear(x2, weight, b)
                continue
            if y is None:
                y = x2.new_empty(x2.shape[0], self.out_features)
            y[tok] = F.linear(x2[tok], weight, b)
        sign_delta_add_(
            y, x2, self.sign_words, self.sign_scales, seg, [(s, batch.views[s].planes) for s in lut]
        )
        for s in batch.with_dq(self.weight_key):
            add_dq_matmul_(y, x2, seg.slot_tokens[s], batch.views[s].dq[self.weight_key])
        for s in batch.with_lowrank(self.weight_key):
            lowrank_add_(y, x2, seg.slot_tokens[s], *batch.views[s].lowrank[self.weight_key])
        return y

    def slot_weight(self, slot: int, planes: int | None = None) -> torch.Tensor:
        """Slot `slot`'s weight, `(W_base.float() + Δ̂).to(dtype)`: bit-identical to what
        `codec.apply.apply_delta` writes (Δ̂ decoded through a byte -> ±1 lookup table, in row
        blocks so the fp32 temporaries stay in cache)."""
        p = slice(None, planes)
        words, scales = self.sign_words[slot, p], self.sign_scales[slot, p]
        weight = torch.empty_like(self.weight)
        step = max(1, REBUILD_BLOCK // max(self.in_features, 1))
        with torch.no_grad():
            for r0 in range(0, self.out_features, step):
                r1 = min(self.out_features, r0 + step)
                reconstruct_words(self.weight[r0:r1], words[:, r0:r1], scales[:, r0:r1], weight[r0:r1])
        return weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class DeltaEmbedding(nn.Module):
    """Embedding lookup from the base table; rows of a slot whose delta compressed the table (sign
    planes, DeltaDQ, low-rank factors, or low-rank + signs) get `(base_row.float() + Δ̂_row).to(dtype)`
    decoded on the fly for the looked-up ids only (bit-exact with the reconstructed model), rows of a
    slot that keeps it dense read the slot's own table."""

    def __init__(self, emb: nn.Embedding, weight_key: str):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, emb.max_norm, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, emb.sparse
        self.weight = emb.weight
        self.weight_key = weight_key

    def attach(self, pool: SlotPool, backend: str) -> None:
        self.register_buffer("sign_words", pool.words[self.weight_key], persistent=False)
        self.register_buffer("sign_scales", pool.scales[self.weight_key], persistent=False)

    def _lookup(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._lookup(ids, self.weight)
        batch = active_batch()
        if batch is None:
            return out
        sign_slots = batch.with_sign(self.weight_key)
        dense_slots = batch.with_dense(self.weight_key)
        dq_slots = batch.with_dq(self.weight_key)
        lowrank_slots = batch.with_lowrank(self.weight_key)
        if not sign_slots and not dense_slots and not dq_slots and not lowrank_slots:
            return out
        _check_rows(batch, ids, f"DeltaEmbedding({self.weight_key})")
        flat_ids = ids.reshape(-1)
        flat = out.view(-1, self.embedding_dim)
        seg = batch.segments(flat_ids.numel() // batch.rows)
        # Δ̂ rows of the sign and low-rank slots, in fp32, summed as the codecs do (low-rank product,
        # then the sign planes) before the one rounding onto the base row.
        lowrank_delta = {}
        for s in lowrank_slots:
            a, b = batch.views[s].lowrank[self.weight_key]
            lowrank_delta[s] = torch.matmul(b[flat_ids[seg.slot_tokens[s]]].float(), a.float())
        if sign_slots:
            tok = torch.cat([seg.slot_tokens[s] for s in sign_slots])
            slots, vocab_rows = seg.token_slots[tok], flat_ids[tok]
            words = self.sign_words[slots, :, vocab_rows]  # [n, P, W]
            scales = self.sign_scales[slots, :, vocab_rows]  # [n, P]
            delta = torch.zeros(tok.numel(), self.embedding_dim, dtype=torch.float32, device=out.device)
            for p in range(words.shape[1]):  # planes in order, as codec.bitdelta.decode sums them
                delta.add_(unpack_words_pm1(words[:, p], self.embedding_dim) * scales[:, p : p + 1])
            start = 0
            for s in sign_slots:  # hybrid slots: the low-rank product first, then the signs
                n = seg.slot_tokens[s].numel()
                if s in lowrank_delta:
                    delta[start : start + n] = lowrank_delta.pop(s) + delta[start : start + n]
                start += n
            flat[tok] = (flat[tok].float() + delta).to(flat.dtype)
        for s, delta in lowrank_delta.items():  # low-rank slots without signs here
            tok = seg.slot_tokens[s]
            flat[tok] = (flat[tok].float() + delta).to(flat.dtype)
        for s in dense_slots:
            tok = seg.slot_tokens[s]
            flat[tok] = self._lookup(flat_ids[tok], batch.views[s].dense[self.weight_key])
        for s in dq_slots:
            tok = seg.slot_tokens[s]
            delta = batch.views[s].dq[self.weight_key].decode(rows=flat_ids[tok])
            flat[tok] = (flat[tok].float() + delta).to(flat.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class DeltaNorm(nn.Module):
    """A norm-like module (1-D parameters only) whose parameters switch per batch row.

    RMSNorms whose forward is verified (bit for bit, at patch time) to be the Llama formula take a
    fused path with per-row weights; any other norm runs once per group of rows sharing a slot,
    through `torch.func.functional_call` with that slot's parameters.
    """

    def __init__(self, inner: nn.Module, keys: dict[str, str], rms_eps: float | None):
        super().__init__()
        for pname, p in inner.named_parameters(recurse=False):
            self.register_parameter(pname, p)
        object.__setattr__(self, "inner", inner)  # unregistered: its parameters are registered above
        self.keys = dict(keys)  # parameter name -> canonical tensor name
        self.rms_eps = rms_eps

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def attach(self, pool: SlotPool, backend: str) -> None:
        for pname, key in self.keys.items():
            self.register_buffer(f"slot_{pname}", pool.tables[key], persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch = active_batch()
        if batch is None:
            return self.inner(x, *args, **kwargs)
        changed = {p: set(batch.with_table(k)) for p, k in self.keys.items()}
        slots = sorted(set().union(*changed.values()))
        if not slots:
            return self.inner(x, *args, **kwargs)
        _check_rows(batch, x, f"DeltaNorm({next(iter(self.keys.values()))})")
        seg = batch.segments(1)  # one "token" per row: the row -> slot map
        if self.rms_eps is not None and not args and not kwargs:
            return self._rms_rows(x, seg.token_slots)
        return self._grouped(x, seg, slots, changed, args, kwargs)

    def _rms_rows(self, x: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        table = self.slot_weight
        w = torch.where((row_slots >= 0).unsqueeze(1), table[row_slots.clamp(min=0)], self.weight)
        w = w.view(x.shape[0], *([1] * (x.dim() - 2)), w.shape[-1])
        return rms_norm_rows(x, w, self.rms_eps)

    def _grouped(self, x, seg, slots, changed, args, kwargs) -> torch.Tensor:
        base_rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        parts = []
        for s in slots:
            rows = seg.slot_tokens[s]
            base_rows[rows] = False
            params = {
                p: (getattr(self, f"slot_{p}")[s] if s in changed[p] else getattr(self, p)) for p in self.keys
            }
            parts.append((rows, functional_call(self.inner, params, (x[rows], *args), kwargs)))
        rest = base_rows.nonzero().squeeze(1)
        if rest.numel():
            parts.append((rest, self.inner(x[rest], *args, **kwargs)))
        out = torch.empty((x.shape[0], *parts[0][1].shape[1:]), dtype=parts[0][1].dtype, device=x.device)
        for rows, y in parts:
            out[rows] = y
        return out


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama/Mistral/Qwen RMSNorm with a weight that broadcasts per row."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def _rms_eps_if_llama_style(module: nn.Module) -> float | None:
    """The module's eps if its forward is the Llama RMSNorm formula (checked bit for bit on a
    random weight and input), else None."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"weight"} or params["weight"].dim() != 1:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, float):
        return None
    w = params["weight"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.shape[0], generator=gen).to(device=w.device, dtype=w.dtype)
    w_rand = (torch.randn(w.shape, generator=gen) + 1.0).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            ref = functional_call(module, {"weight": w_rand}, (x,))
            mine = rms_norm_rows(x, w_rand, eps)
    except Exception:
        return None
    return eps if ref.shape == mine.shape and torch.equal(ref, mine) else None


@dataclass
class PatchPlan:
    """What the patcher replaced, by canonical tensor name (the name the checkpoint stores)."""

    modules: list[nn.Module] = field(default_factory=list)
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # canonical name -> parameter
    sign: dict[str, tuple[int, int]] = field(default_factory=dict)
    table: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    dense: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)

    def layout(self, planes: int, max_rank: int = 0, factor_dtype: torch.dtype | None = None) -> PoolLayout:
        """The pool layout for these modules; low-rank factors default to the weights' dtype."""
        if factor_dtype is None:
            factor_dtype = next((dtype for _, dtype in self.dense.values()), torch.float32)
        return PoolLayout(
            sign=dict(self.sign),
            table=dict(self.table),
            dense=dict(self.dense),
            planes=planes,
            max_rank=max_rank,
            factor_dtype=factor_dtype,
        )

    def base_tables(self) -> dict[str, torch.Tensor]:
        """Immutable device copies of the small tensors, to initialise table rows (not the live
        parameters, which merge mode changes in place)."""
        return {n: self.params[n].detach().clone() for n in self.table}

    def attach(self, pool: SlotPool, backend: str) -> None:
        for m in self.modules:
            m.attach(pool, backend)


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the name it is saved under (the first of its names: tied weights such as
    `lm_head.weight` are aliases of `model.embed_tokens.weight`)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def patch_model(model: nn.Module, *, target_modules: Sequence[str] | None = None) -> PatchPlan:
    """Replace, in place, every (targeted) nn.Linear, every nn.Embedding and every norm-like leaf
    module (1-D parameters only) by its delta-aware counterpart. `target_modules` are fnmatch
    patterns over module names restricting which linears take sign deltas (default: all)."""
    canon = canonical_names(model)
    plan = PatchPlan()
    replacements: list[tuple[str, nn.Module]] = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (DeltaLinear, DeltaEmbedding, DeltaNorm)):
            raise RuntimeError("the model is already patched by the GPU loader")
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, nn.Linear):
            if target_modules is not None and not any(fnmatch.fnmatchcase(mname, p) for p in target_modules):
                continue
            wkey = canon[id(mod.weight)]
            bkey = canon[id(mod.bias)] if mod.bias is not None else None
            new = DeltaLinear(mod, wkey, bkey)
            plan.sign[wkey] = (mod.out_features, mod.in_features)
            plan.dense[wkey] = (tuple(mod.weight.shape), mod.weight.dtype)
            if bkey is not None:
                plan.table[bkey] = (tuple(mod.bias.shape), mod.bias.dtype)
            plan.params.update({wkey: mod.weight, **({bkey: mod.bias} if bkey else {})})
        elif isinstance(mod, nn.Embedding):
            wkey = canon[id(mod.weight)]
            new = DeltaEmbedding(mod, wkey)
            plan.sign[wkey] = tuple(mod.weight.shape)
            plan.dense[wkey] = (tuple(mod.weight.shape), mod.weight.dtype)
            plan.params[wkey] = mod.weight
        elif own and all(p.dim() == 1 for p in own.values()) and not any(True for _ in mod.children()):
            keys = {pn: canon[id(p)] for pn, p in own.items()}
            new = DeltaNorm(mod, keys, _rms_eps_if_llama_style(mod))
            for pn, p in own.items():
                plan.table[keys[pn]] = (tuple(p.shape), p.dtype)
                plan.params[keys[pn]] = p
        else:
            continue
        replacements.append((mname, new))
        plan.modules.append(new)
    for mname, new in replacements:
        parent_name, _, child = mname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not mname:
            raise RuntimeError("cannot patch a model that is itself a single linear/embedding/norm")
        setattr(parent, child, new)
    return plan
