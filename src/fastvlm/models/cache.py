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

    def write(self, layer: int, rows: slice, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, T, nkv, hd) of cache rows ``rows`` (B of them) at columns ``slots`` (B, T)."""
        index = torch.arange(rows.start, rows.stop, device=k.device)[:, None].expand_as(slots)  # (B, T)
        # Advanced indices on dims 0 and 2 put (B, T) first: the target is (B, T, nkv, hd).
        self.k[layer][index, :, slots] = k
        self.v[layer][index, :, slots] = v

    def read(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` columns of cache rows ``rows``: views of (B, nkv, length, hd)."""
        return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst`` (keeps running sequences packed at the front)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of row ``src`` into row ``dst``: a prompt
        prefilled once then continues in several rows (``n`` choices)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
