"""Per-sequence KV cache of the serving engine: one pre-allocated row per running sequence in
per-layer buffers, and the per-forward view (`StepCache`) the HF attention layers write into.

Row r of every layer's `[rows, kv_heads, capacity, head_dim]` buffer holds one sequence; a forward
names the rows of its batch and where each row's new tokens go, so sequences of different lengths
decode together without re-padding or copying their past (HF's DynamicCache would concatenate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def model_kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a HF decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class KVStore:
    """K/V buffers for `rows` sequences of up to `max_len` tokens; the length capacity grows by
    doubling (one copy), so short traffic does not reserve the whole context."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        rows: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_len: int = 256,
    ) -> None:
        self.rows, self.max_len, self.dtype, self.device = rows, max_len, dtype, torch.device(device)
        self.capacity = min(max_len, initial_len)
        shape = (rows, kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def ensure(self, length: int) -> None:
        """Make room for `length` positions in every row."""
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the model's context of {self.max_len}")
        if length <= self.capacity:
            return
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = torch.zeros((*t.shape[:2], new, t.shape[3]), dtype=t.dtype, device=t.device)
                grown[:, :, : self.capacity] = t
                buf[i] = grown
        self.capacity = new

    def swap(self, a: int, b: int) -> None:
        """Exchange the contents of rows `a` and `b` (keeps decoding rows contiguous)."""
        if a == b:
            return
        idx = torch.tensor([a, b], device=self.device)
        rev = torch.tensor([b, a], device=self.device)
        for buf in (self.k, self.v):
            for t in buf:
                t[idx] = t[rev]


@dataclass
class StepCache:
    """What one forward hands to the HF model as its cache: batch row b is store row `rows[b]`,
    its new tokens go to positions `starts[b] : starts[b] + q`. `update` writes them and returns
    the row's keys/values up to the longest row (shorter rows are masked by `attention_mask`)."""

    store: KVStore
    rows: list[int]
    starts: list[int]
    q: int

    def __post_init__(self) -> None:
        dev = self.store.device
        self.kv_len = max(self.starts) + self.q
        self._contiguous = self.rows == list(range(self.rows[0], self.rows[0] + len(self.rows)))
        self._rows_t = torch.tensor(self.rows, device=dev)
        self._starts_t = torch.tensor(self.starts, device=dev)
        self.store.ensure(self.kv_len)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k_buf, v_buf = self.store.k[layer_idx], self.store.v[layer_idx]
        if self.q == 1:
            k_buf[self._rows_t, :, self._starts_t] = key_states[:, :, 0]
            v_buf[self._rows_t, :, self._starts_t] = value_states[:, :, 0]
        else:
            for b, (row, start) in enumerate(zip(self.rows, self.starts, strict=True)):
                k_buf[row, :, start : start + self.q] = key_states[b]
                v_buf[row, :, start : start + self.q] = value_states[b]
        if self._contiguous:
            r0 = self.rows[0]
            return k_buf[r0 : r0 + len(self.rows), :, : self.kv_len], v_buf[
                r0 : r0 + len(self.rows), :, : self.kv_len
            ]
        return k_buf[self._rows_t, :, : self.kv_len], v_buf[self._rows_t, :, : self.kv_len]

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive `[batch, 1, q, kv_len]` mask: query i of row b sees positions ≤ starts[b] + i."""
        dev = self.store.device
        limit = self._starts_t[:, None] + torch.arange(self.q, device=dev)[None, :]  # [B, q]
        keys = torch.arange(self.kv_len, device=dev)
        allowed = keys[None, None, :] <= limit[:, :, None]  # [B, q, kv]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def position_ids(self) -> torch.Tensor:
        return self._starts_t[:, None] + torch.arange(self.q, device=self.store.device)[None, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len - self.q
