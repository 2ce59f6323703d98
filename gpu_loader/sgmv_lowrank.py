"""Multi-tenant low-rank delta matmul (the LoRA shape, punica's sgmv_shrink / sgmv_expand): for each
token t whose row uses slot s, with factors a [S, R, in] and b [S, out, R] and rank r = ranks[s],

    shrink:  xa[t, :r] = x[t] · a[s, :r]ᵀ                  (fp32, [T, R])
    expand:  y[t]     += xa[t, :r] · b[s, :, :r]ᵀ

added to the base GEMM output `y = x·W_baseᵀ` in place. Tokens are grouped by slot into tiles
(`segments.Segments`), as for the sign kernel; a slot whose rank here is 0 (no low-rank term on
this tensor, or no delta at all) returns at once. Factors are padded to the pool's rank R; loads
past a slot's own rank are masked, so a slot of rank r reads r·(in + out) factor values.

This file holds the two kernels, their launcher (`sgmv_lowrank_triton`) and `sgmv_lowrank`, which
picks a backend; the torch path is `sgmv_reference.sgmv_lowrank_reference`.
"""

from __future__ import annotations

import torch

from .segments import Segments
from .sgmv import ACTIVATION_DTYPES, auto_backend, triton, triton_interpreting
from .sgmv_reference import sgmv_lowrank_reference

if triton is not None:
    import triton.language as tl

#: Block sizes (input columns per shrink step, output columns per expand program); one fixed
#: configuration: the rank block is the whole padded rank, so both kernels are one skinny dot per step.
SHRINK_BLOCK_K = 64
EXPAND_BLOCK_N = 64
INTERPRETER_BLOCKS = {"SHRINK_BLOCK_K": 256, "EXPAND_BLOCK_N": 256}  # fewer interpreted steps


def rank_block(rank: int) -> int:
    """The rank tile: a power of two >= 16 (tl.dot's smallest operand side) covering `rank`."""
    return max(16, 1 << max(rank - 1, 0).bit_length())


if triton is not None:

    @triton.jit
    def _sgmv_shrink_kernel(
        x_ptr,
        a_ptr,
        xa_ptr,
        ranks_ptr,
        perm_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_len_ptr,
        K,
        stride_xm,
        stride_xk,
        stride_as,
        stride_ar,
        stride_ak,
        stride_xam,
        stride_xar,
        stride_rank,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_k = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        rank = tl.load(ranks_ptr + slot * stride_rank)
        if rank == 0:
            return  # no low-rank term of this slot on this tensor
        start = tl.load(tile_start_ptr + tile)
        rows = tl.load(tile_len_ptr + tile)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < rows
        tok = tl.load(perm_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + tok[:, None] * stride_xm
        a_rows = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            kk = k0 + offs_k
            k_mask = kk < K
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # aᵀ tile [BLOCK_K, BLOCK_R]: rank r's row of a is column r here
            a = tl.load(a_rows + kk[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x, a.to(x.dtype), acc, input_precision=PRECISION)
        xa_ptrs = xa_ptr + tok[:, None] * stride_xam + offs_r[None, :] * stride_xar
        mask = m_mask[:, None] & r_mask[None, :]
        if SPLIT_K == 1:
            tl.store(xa_ptrs, acc, mask=mask)
        else:
            tl.atomic_add(xa_ptrs, acc, mask=mask)

    @triton.jit
    def _sgmv_expand_kernel(
        xa_ptr,
        b_ptr,
        y_ptr,
        ranks_ptr,
        perm_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_len_ptr,
        N,
        stride_xam,
        stride_xar,
        stride_bs,
        stride_bn,
        stride_br,
        stride_ym,
        stride_yn,
        stride_rank,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        tile = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        rank = tl.load(ranks_ptr + slot * stride_rank)
        if rank == 0:
            return
        start = tl.load(tile_start_ptr + tile)
        rows = tl.load(tile_len_ptr + tile)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < rows
        tok = tl.load(perm_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        xa = tl.load(
            xa_ptr + tok[:, None] * stride_xam + offs_r[None, :] * stride_xar,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        # bᵀ tile [BLOCK_R, BLOCK_N]
        b = tl.load(
            b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if DOT_F32:
            out = tl.dot(xa, b.to(tl.float32), input_precision=PRECISION)
        else:
            out = tl.dot(xa.to(b.dtype), b, input_precision=PRECISION)
        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + out).to(y_ptr.dtype.element_ty), mask=mask)


def _check_args(x, y, a, b, ranks):
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [T, in] and y [T, out], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype not in ACTIVATION_DTYPES or y.dtype != x.dtype:
        raise TypeError(
            f"x and y must share an activation dtype {ACTIVATION_DTYPES}, got {x.dtype} and {y.dtype}"
        )
    K, N = x.shape[1], y.shape[1]
    if a.dim() != 3 or a.shape[2] != K or b.dim() != 3 or tuple(b.shape[::2]) != (a.shape[0], a.shape[1]):
        raise ValueError(
            f"factors must be a [S, R, {K}] and b [S, {N}, R] for x {tuple(x.shape)} and y "
            f"{tuple(y.shape)}, got a {list(a.shape)} and b {list(b.shape)}"
        )
    if b.shape[1] != N:
        raise ValueError(f"b must be [S, {N}, R] for y {tuple(y.shape)}, got {list(b.shape)}")
    if a.dtype not in ACTIVATION_DTYPES or b.dtype != a.dtype:
        raise TypeError(f"factors must share a float dtype {ACTIVATION_DTYPES}, got {a.dtype} and {b.dtype}")
    if ranks.dim() != 1 or ranks.shape[0] < a.shape[0] or ranks.dtype != torch.int32:
        raise ValueError(f"ranks must be int32 [>= {a.shape[0]}], got {ranks.dtype}{list(ranks.shape)}")
    devices = {t.device for t in (x, y, a, b, ranks)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def sgmv_lowrank_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    segments: Segments,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """Launch shrink then expand: `y += (x·aᵀ)·bᵀ` in place for every tile of `segments`. Returns `y`.

    `split_k` (default: up to 8 on GPU, 1 under the interpreter) splits shrink's input axis over
    that many programs per tile, which add their partial sums atomically."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the torch path (backend='torch')")
    _check_args(x, y, a, b, ranks)
    R = a.shape[1]
    if segments.n_tiles == 0 or y.numel() == 0 or R == 0:
        return y
    (T, K), N = x.shape, y.shape[1]
    interpret = triton_interpreting()
    # The interpreter's dot mishandles bf16 operands; give it fp32 ones.
    dot_f32 = x.dtype == torch.float32 or (interpret and x.dtype == torch.bfloat16)
    precision = "ieee" if dot_f32 else "tf32"
    block_k = INTERPRETER_BLOCKS["SHRINK_BLOCK_K"] if interpret else SHRINK_BLOCK_K
    block_n = INTERPRETER_BLOCKS["EXPAND_BLOCK_N"] if interpret else EXPAND_BLOCK_N
    # Decode has few tiles: split the input axis over programs (fp32 atomics) to fill the GPU.
    if split_k is None:
        split_k = 1 if interpret else max(1, min(8, triton.cdiv(K, block_k), 128 // segments.n_tiles))
    xa = (torch.zeros if split_k > 1 else torch.empty)((T, R), dtype=torch.float32, device=x.device)
    block_r, block_m = rank_block(R), segments.block_m
    seg = (segments.perm, segments.tile_slot, segments.tile_start, segments.tile_len)
    _sgmv_shrink_kernel[(segments.n_tiles, split_k)](
        x,
        a,
        xa,
        ranks,
        *seg,
        K,
        x.stride(0),
        x.stride(1),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        xa.stride(0),
        xa.stride(1),
        ranks.stride(0),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        DOT_F32=dot_f32,
        PRECISION=precision,
    )
    _sgmv_expand_kernel[(triton.cdiv(N, block_n), segments.n_tiles)](
        xa,
        b,
        y,
        ranks,
        *seg,
        N,
        xa.stride(0),
        xa.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        y.stride(0),
        y.stride(1),
        ranks.stride(0),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        DOT_F32=dot_f32,
        PRECISION=precision,
    )
    return y


def sgmv_lowrank(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    segments: Segments,
    *,
    backend: str = "auto",
    slots: list[int] | None = None,
) -> torch.Tensor:
    """`y += (x·aᵀ)·bᵀ` per token slot, with the Triton kernels or the torch path.

    `slots` (torch path only) restricts the work to those slots; the kernels read `ranks`.
    """
    if backend == "auto":
        backend = auto_backend(x.device)
    if backend == "triton":
        return sgmv_lowrank_triton(x, y, a, b, ranks, segments)
    if backend == "torch":
        return sgmv_lowrank_reference(x, y, a, b, ranks, segments, slots)
    raise ValueError(f"unknown backend {backend!r} (auto, triton, torch)")
