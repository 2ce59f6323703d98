"""Multi-tenant 1-bit delta matmul (SGMV over sign planes): for each token t whose row uses slot s,

    y[t, o] += Σ_p scale[s, p, o] · Σ_i x[t, i]·(2·bit[s, p, o, i] − 1)
             = Σ_p scale[s, p, o] · (2·(x[t]·bits[s, p, o]) − Σ_i x[t, i])

added to the dense base GEMM output `y = x·W_baseᵀ`. Tokens are grouped by slot into tiles
(`segments.Segments`); one program per (out block, tile) unpacks the slot's packed int32 sign
words in registers (shifts and masks, never a dense ±1 tensor in memory), accumulates in fp32
and writes `y` back in the activation dtype.

Layout (slot pool): words int32 [S, P, out, ceil(in/32)], bit j of word w = input column 32w+j
(the file's LSB-first uint8 rows padded to 4 bytes and read little-endian); scales f32
[S, P, out] (per row) or [S, P, 1] (per matrix); active int32 [≥ S] (0 = slot has no sign delta
here; slots ≥ S, table-only, are always 0).

This file holds the kernel, its configs and its launcher; the torch reference is
`sgmv_reference.sgmv_sign_reference` (CPU and test oracle); `sgmv_sign` picks one.
"""

from __future__ import annotations

import os

import torch

from .layout import words_per_row
from .segments import Segments
from .sgmv_reference import sgmv_sign_reference

try:  # triton is optional: the torch path serves without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of `device` (compiled on CUDA, interpreted on CPU)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return not triton_interpreting()
    return device.type == "cpu" and triton_interpreting()


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
def _gpu_configs():
    cfg = []
    for bn, bk, warps, stages in (
        (32, 256, 4, 3),
        (64, 128, 4, 3),
        (64, 256, 4, 3),
        (64, 512, 8, 3),
        (128, 128, 4, 3),
        (128, 256, 8, 3),
        (32, 512, 4, 4),
        (128, 64, 4, 4),
    ):
        cfg.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return cfg


#: The one fixed configuration used under the interpreter (large blocks: fewer interpreted steps).
INTERPRETER_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 256}

if triton is not None:

    @triton.jit
    def _sgmv_sign_kernel(
        # tensors
        x_ptr,
        y_ptr,
        words_ptr,
        scales_ptr,
        active_ptr,
        # segment table
        perm_ptr,
        tile_slot_ptr,
        tile_start_ptr,
        tile_len_ptr,
        # sizes
        N,
        K,
        P,
        # strides
        stride_xm,
        stride_xk,
        stride_ym,
        stride_yn,
        stride_ws,
        stride_wp,
        stride_wn,
        stride_ss,
        stride_sp,
        stride_sn,
        stride_active,
        # meta
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        tile = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
        if tl.load(active_ptr + slot * stride_active) == 0:
            return  # this slot's delta leaves this layer unchanged
        start = tl.load(tile_start_ptr + tile)
        rows = tl.load(tile_len_ptr + tile)

        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < rows
        tok = tl.load(perm_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_w = tl.arange(0, BLOCK_K // 32)
        shifts = tl.arange(0, 32)
        n_words = (K + 31) // 32

        x_rows = x_ptr + tok[:, None] * stride_xm
        w_base = words_ptr + slot * stride_ws + offs_n[None, :] * stride_wn
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in range(P):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                x = tl.load(
                    x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & (kk[None, :] < K), other=0.0
                )
                ww = k0 // 32 + offs_w
                # [BLOCK_K/32, BLOCK_N] packed words -> [BLOCK_K, BLOCK_N] bits, in registers
                w = tl.load(
                    w_base + p * stride_wp + ww[:, None],
                    mask=(ww[:, None] < n_words) & n_mask[None, :],
                    other=0,
                )
                bits = (w[:, None, :] >> shifts[None, :, None]) & 1
                bits = tl.reshape(bits, (BLOCK_K, BLOCK_N))
                if DOT_F32:
                    acc = tl.dot(x.to(tl.float32), bits.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(x, bits.to(x.dtype), acc, input_precision=PRECISION)
                xsum += tl.sum(x.to(tl.float32), axis=1)
            s = tl.load(
                scales_ptr + slot * stride_ss + p * stride_sp + offs_n * stride_sn, mask=n_mask, other=0.0
            )
            out += s[None, :] * (2.0 * acc - xsum[:, None])

        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + out).to(y_ptr.dtype.element_ty), mask=mask)

    # The kernel adds into y in place, so the autotuner must restore y between trials.
    _sgmv_sign_tuned = triton.autotune(
        configs=_gpu_configs(), key=["N", "K", "BLOCK_M"], restore_value=["y_ptr"]
    )(_sgmv_sign_kernel)


def _check_args(x, y, words, scales, active):
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [T, in] and y [T, out], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype not in ACTIVATION_DTYPES or y.dtype != x.dtype:
        raise TypeError(
            f"x and y must share an activation dtype {ACTIVATION_DTYPES}, got {x.dtype} and {y.dtype}"
        )
    T, K = x.shape
    N = y.shape[1]
    if (
        words.dtype != torch.int32
        or words.dim() != 4
        or words.shape[2] != N
        or words.shape[3] != words_per_row(K)
    ):
        raise ValueError(
            f"words must be int32 [S, P, {N}, {words_per_row(K)}] "
            f"for x {tuple(x.shape)} and y {tuple(y.shape)}, "
            f"got {words.dtype}{list(words.shape)}"
        )
    if words.stride(3) != 1:
        raise ValueError("words must be contiguous along the word axis")
    S, P = words.shape[:2]
    if (
        scales.dtype != torch.float32
        or scales.dim() != 3
        or tuple(scales.shape[:2]) != (S, P)
        or scales.shape[2] not in (1, N)
    ):
        raise ValueError(
            f"scales must be float32 [{S}, {P}, {N} or 1], got {scales.dtype}{list(scales.shape)}"
        )
    # Table-only slots (indices >= S) have flags but no words; their flags are 0, so the kernel
    # returns before it would read words of theirs.
    if active.dim() != 1 or active.shape[0] < S or active.dtype != torch.int32:
        raise ValueError(f"active must be int32 [>= {S}], got {active.dtype}{list(active.shape)}")
    devices = {t.device for t in (x, y, words, scales, active)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def sgmv_sign_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    active: torch.Tensor,
    segments: Segments,
) -> torch.Tensor:
    """Launch the kernel: `y += delta(x)` in place for every tile of `segments`. Returns `y`."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the torch path (backend='torch')")
    _check_args(x, y, words, scales, active)
    if segments.n_tiles == 0 or y.numel() == 0:
        return y
    N, K = y.shape[1], x.shape[1]
    interpret = triton_interpreting()
    # The interpreter's dot mishandles bf16 operands; give it fp32 ones (bits are exact either way).
    dot_f32 = interpret and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 or dot_f32 else "tf32"  # fp32 stays fp32 (no tf32)
    args = (
        x,
        y,
        words,
        scales,
        active,
        segments.perm,
        segments.tile_slot,
        segments.tile_start,
        segments.tile_len,
        N,
        K,
        words.shape[1],
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        words.stride(0),
        words.stride(1),
        words.stride(2),
        scales.stride(0),
        scales.stride(1),
        scales.stride(2) if scales.shape[2] != 1 else 0,
        active.stride(0),
    )
    if interpret:
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), segments.n_tiles)
        _sgmv_sign_kernel[grid](*args, BLOCK_M=segments.block_m, DOT_F32=dot_f32, PRECISION=precision, **cfg)
    else:

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), segments.n_tiles)

        _sgmv_sign_tuned[grid](*args, BLOCK_M=segments.block_m, DOT_F32=False, PRECISION=precision)
    return y


def auto_backend(device: torch.device) -> str:
    """What `backend="auto"` means on `device`: the Triton kernels on CUDA when Triton can run
    there, the torch path otherwise."""
    return "triton" if device.type == "cuda" and triton_available(device) else "torch"


def sgmv_sign(
    x: torch.Tensor,
    y: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    active: torch.Tensor,
    segments: Segments,
    *,
    backend: str = "auto",
    slots: list[int] | None = None,
) -> torch.Tensor:
    """`y += Σ_p scale·(x·signᵀ)` per token slot, with the Triton kernel or the torch reference.

    `slots` (torch path only) restricts the work to those slots; the kernel reads `active`.
    """
    if backend == "auto":
        backend = auto_backend(x.device)
    if backend == "triton":
        return sgmv_sign_triton(x, y, words, scales, active, segments)
    if backend == "torch":
        return sgmv_sign_reference(x, y, words, scales, segments, slots)
    raise ValueError(f"unknown backend {backend!r} (auto, triton, torch)")
