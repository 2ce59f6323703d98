"""The CPU (torch backend) path of sign deltas: `x·Δ̂ᵀ` by byte-table look-up for the few tokens a
slot has per decode step (a small compiled kernel, or torch ops), and the exact rebuild of a
slot's weight for prefill-sized groups.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from codec.bitdelta import pm1_lut

from .segments import Segments


def reconstruct_words(
    base: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """`out ← (base.float() + Δ̂).to(out.dtype)` for a block of rows (words [P, rows, W], scales
    [P, rows | 1]), bit-identical to `codec.bitdelta.reconstruct`, in three passes over the block.

    `reconstruct` sums the planes onto +0.0; a first plane with scale 0 would give −0.0 here
    instead, which differs only for base values of −0.0, so those rows are set to +0.0 explicitly.
    """
    planes, rows, _ = words.shape
    inn = base.shape[1]
    lut = pm1_lut(words.device)
    delta = None
    for p in range(planes):
        by = words[p].contiguous().view(torch.uint8)
        pm1 = torch.nn.functional.embedding(by.to(torch.int32), lut).reshape(rows, -1)[:, :inn]
        s = scales[p].to(torch.float32).reshape(-1, 1)
        if delta is None:
            delta = pm1.mul(s)
            zero = s.reshape(-1) == 0
            if bool(zero.any()):
                delta[zero.expand(rows) if zero.numel() == 1 else zero] = 0.0
        else:
            delta.add_(pm1.mul_(s))
    return torch.add(delta, base, out=out)


def sign_matmul_lut(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x·Δ̂ᵀ` in fp32 for one slot (words [P, out, W], scales [P, out | 1]) without decoding Δ̂.

    For every group of 8 input columns the 256 possible ±1 dot products of each token are
    tabulated once (`T[b·256 + v, n]`); each packed sign byte then selects its entry, so an output
    costs in/8 table look-ups instead of `in` multiply-adds, and no ±1 matrix is ever built.
    The CPU path for decode-sized token groups (the table grows with the tokens).
    """
    n, inn = x.shape
    planes, out, _ = words.shape
    nb = (inn + 7) // 8
    xp = torch.nn.functional.pad(x.float(), (0, nb * 8 - inn)).view(n, nb, 8)
    table = (xp @ pm1_lut(x.device).T).reshape(n, nb * 256).T.contiguous()  # [nb*256, n]
    offsets = torch.arange(nb, dtype=torch.int32, device=x.device) * 256
    y = torch.zeros(out, n, dtype=torch.float32, device=x.device)
    for p in range(planes):
        index = words[p].view(torch.uint8)[:, :nb].to(torch.int32) + offsets  # [out, nb]
        picked = torch.nn.functional.embedding(index, table)  # [out, nb, n]
        y += picked.sum(1) * scales[p].to(torch.float32).reshape(-1, 1)
    return y.T


# --------------------------------------------------------------------------------------------
# Compiled byte-table kernel (csrc/sign_delta_cpu.cpp), built on first use
# --------------------------------------------------------------------------------------------
_SOURCE = Path(__file__).with_name("csrc") / "sign_delta_cpu.cpp"
_KERNEL_ENV = "DELTASTORE_CPU_KERNEL"  # "0" turns the compiled kernel off (the torch path then serves)
_kernel = None
_kernel_error: str | None = None
_kernel_lock = threading.Lock()
_STALE_LOCK_SECONDS = 600


def cpu_kernel():
    """The compiled CPU kernel module, built with the system's C++ compiler the first time (about a
    minute; cached under ~/.cache/torch_extensions/py*_torch*), or None when it is turned off or
    cannot be built (`cpu_kernel_error()` says why; the torch path serves then)."""
    global _kernel, _kernel_error
    if _kernel is not None or _kernel_error is not None:
        return _kernel
    with _kernel_lock:
        if _kernel is None and _kernel_error is None:
            if os.environ.get(_KERNEL_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
                _kernel_error = f"turned off by {_KERNEL_ENV}=0"
                return None
            try:
                _kernel = build_cpu_kernel()
            except Exception as exc:  # no compiler, no ninja, a failed build: the torch path serves
                _kernel_error = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                )
                warnings.warn(
                    f"gpu_loader: the compiled CPU delta kernel is unavailable ({_kernel_error}); "
                    "decode steps with deltas take the slower torch path",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _kernel


def build_cpu_kernel(portable: bool = False):
    """Compile (or load from torch's extension cache) the kernel for this machine: `-march=native`,
    so an AVX-512 machine gets the register-table path; `portable=True` builds the byte-table path
    that machines without AVX-512 run (the tests build both)."""
    from torch.utils.cpp_extension import load

    # -march=native: the build is cached per machine kind (the name carries the ISA).
    isa = "no_avx512" if portable else torch.backends.cpu.get_cpu_capability().lower()
    name = f"deltastore_sign_delta_cpu_{isa}"
    flags = ["-O3", "-march=native", "-fopenmp"] + (["-mno-avx512f"] if portable else [])
    build_dir = kernel_build_dir(name)
    # torch serializes builds with a lock file that a build killed midway leaves behind, and every
    # later load would wait on it forever; a build takes about a minute, so an old lock is stale.
    lock = build_dir / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            lock.unlink()
    return load(
        name=name,
        sources=[str(_SOURCE)],
        build_directory=str(build_dir),
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def kernel_build_dir(name: str) -> Path:
    """Where the kernel `name` is built and cached: one folder per Python and torch build (torch's
    default folder does not tell two CPU builds of torch apart)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    path = Path(root) / tag / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_kernel_error() -> str | None:
    """Why `cpu_kernel()` returned None (None while it is available or not yet tried)."""
    return _kernel_error


def sign_delta_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    segments: Segments,
    slot_planes: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """`y[t] += x[t]·Δ̂[slot(t)]ᵀ` for the tokens of each `(slot, planes)` in `slot_planes` (words
    [S, P, out, W], scales [S, P, out]; a slot's first `planes` planes), accumulated in fp32 and
    rounded once to y's dtype: the compiled kernel when it is available, else the torch table path.
    Modifies and returns `y`."""
    if not slot_planes:
        return y
    kernel = cpu_kernel() if x.device.type == "cpu" else None
    if kernel is not None:
        perm, table = segments.memo(
            ("sign_delta_groups", tuple(slot_planes)), lambda: _groups(segments, slot_planes)
        )
        kernel.sign_delta_add(y, x.contiguous(), words, scales, perm, table)
        return y
    for slot, planes in slot_planes:
        tok = segments.slot_tokens[slot]
        delta = sign_matmul_lut(x[tok], words[slot, :planes], scales[slot, :planes])
        y[tok] = (y[tok].float() + delta).to(y.dtype)
    return y


def _groups(segments: Segments, slot_planes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's token list and its (slot, start, count, planes) rows, once per forward."""
    tokens = [segments.slot_tokens[s] for s, _ in slot_planes]
    rows, start = [], 0
    for (slot, planes), tok in zip(slot_planes, tokens, strict=True):
        rows.append((slot, start, tok.numel(), planes))
        start += tok.numel()
    return torch.cat(tokens).contiguous(), torch.tensor(rows, dtype=torch.int64)
