"""A static, preallocated key/value cache for the decoder.

Rows are independent: every token is written at an explicit (row, column) slot, so
the same cache serves a left-padded batch (all rows share columns) and a continuous
batch (each row has its own length). Which columns a query may see is decided by
the caller's attention mask, not by the cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.batch_size = batch_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, nkv, T, hd) at columns ``slots`` (B, T) of rows 0..B-1."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)  # (B, T)
        # Advanced indices on dims 0 and 2 put (B, T) first: the target is (B, T, nkv, hd).
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def read(self, layer: int, length: int, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` columns of the first ``batch`` rows: (B, nkv, length, hd) each."""
        b = self.batch_size if batch is None else batch
        return self.k[layer, :b, :, :length], self.v[layer, :b, :, :length]
