"""Weight-only quantisation of the decoder, the LM head and the projector.

Decoding one token reads every decoder weight once, so on a CPU its speed is set by
memory bandwidth: int8 weights halve the bytes per token, int4 quarter them.
Activations stay in the model's dtype. Each layer keeps an eager path that
dequantises and runs a dense matmul; tests hold the packed kernels to it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastVLMError

if TYPE_CHECKING:
    from .fastvlm import FastVLMCore


class QuantizedLinear(nn.Module):
    """What both weight formats share: (…, in) -> (…, out) through ``_matmul`` on rows, plus bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))  # (M, in) -> (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


# ---- int8: one scale per output channel -------------------------------------------------


class Int8Linear(QuantizedLinear):
    """y = x @ (q * s)^T + b with q int8 (out, in) and one scale per output channel.

    The packed kernel is used for up to ``packed_max_rows`` rows (decoding) with bf16/fp16
    activations on CPU; above that, and elsewhere, the eager path dequantises on the fly.
    """

    def __init__(self, linear: nn.Linear, packed_max_rows: int = 16) -> None:
        super().__init__(linear)
        self.packed_max_rows = packed_max_rows
        weight = linear.weight.detach()
        qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], device=weight.device)  # (out,), float32
        for rows in _row_chunks(weight.shape[0]):
            w = weight[rows].float()
            scale[rows] = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            qweight[rows] = torch.round(w / scale[rows, None]).clamp(-127, 127)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(weight.dtype))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        kernel_ok = x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
        if kernel_ok and x.shape[0] <= self.packed_max_rows:
            return torch._weight_int8pack_mm(x, self.qweight, self.scale.to(x.dtype))
        # Many rows (a prefill): the packed kernel is a matrix-vector kernel and loses
        # to dequantising once (one fused int8 * scale op) and a dense matmul.
        return F.linear(x, self.qweight * self.scale.to(x.dtype)[:, None])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed_max_rows={self.packed_max_rows}"


# ---- int4: a scale and an offset per group of input channels ----------------------------

_INT4_BLOCK_N = 64  # the CPU packer tiles output channels in blocks of 64
_INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the kernel accepts


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weights -> q (N, K) int32 in [0, 16), scale and offset (N, K/gs) such
    that w ~= (q - 8) * scale + offset within each group of ``group_size`` columns."""
    N, K = w.shape
    groups = w.view(N, K // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/gs)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).view(N, K).int()
    return q, scale, low + 8 * scale  # the offset is where q = 8 lands: the group's middle


class Int4Linear(QuantizedLinear):
    """y = x @ W^T + b with W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n], g = k // group_size.

    q is 4-bit, stored in the layout of torch's CPU int4 kernel, two values a byte; the
    scale and offset of each group are stacked as (K / group_size, N, 2). On CPU the
    kernel serves up to ``kernel_max_rows`` rows; past that, dequantising once and running
    a dense matmul is faster (a long prefill). Other devices always take that path.
    """

    def __init__(self, linear: nn.Linear, group_size: int, kernel_max_rows: int = 192) -> None:
        super().__init__(linear)
        self.kernel_max_rows = kernel_max_rows
        weight = linear.weight.detach()
        N, K = weight.shape
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        scale = torch.empty(N, K // group_size)  # float32
        offset = torch.empty(N, K // group_size)
        # Row chunks are whole 64-row blocks of the packed layout, so packing them one at
        # a time gives the same bytes as packing the whole matrix.
        for rows in _row_chunks(N):
            q, scale[rows], offset[rows] = quantize_groups(weight[rows].float().cpu(), group_size)
            packed[rows] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("packed", packed.to(weight.device))
        scale_offset = torch.stack([scale.t(), offset.t()], dim=-1)  # (K/gs, N, 2)
        self.register_buffer("scale_offset", scale_offset.to(weight.dtype).contiguous().to(weight.device))
        self.group_size = group_size

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] <= self.kernel_max_rows:
            rows = x.contiguous()  # the kernel needs dense rows
            return torch._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.group_size, self.scale_offset.to(x.dtype)
            )
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, kernel_max_rows={self.kernel_max_rows}"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight this layer computes with."""
        N, K, gs = self.out_features, self.in_features, self.group_size
        scale, offset = self.scale_offset.float().permute(2, 1, 0)  # each (N, K/gs)
        # W = q * s + (z - 8 s). Contiguous per-group terms: broadcasting the permuted
        # views directly makes this ~4x slower.
        base = (offset - 8 * scale).to(dtype).contiguous()
        q = unpack_int4(self.packed, N, K).to(dtype).view(N, K // gs, gs)
        return q.mul_(scale.to(dtype).contiguous()[..., None]).add_(base[..., None]).view(N, K)


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The CPU packer's (N, K/2) bytes back to (N, K) values in [0, 16).

    Its layout: blocks of 64 output channels; within a block, for each input channel
    k, 32 bytes whose low nibbles are channels 0-31 and high nibbles channels 32-63.
    """
    blocks = packed.view(N // _INT4_BLOCK_N, K, _INT4_BLOCK_N // 2)  # (N/64, K, 32)
    values = torch.cat([blocks & 15, blocks >> 4], dim=2)  # (N/64, K, 64)
    return values.transpose(1, 2).reshape(N, K)  # (N/64, 64, K) -> (N, K)


@cache
def _int4_kernel_works(dtype: torch.dtype) -> bool:
    """Whether this torch build packs int4 the way ``unpack_int4`` reads it, and its
    kernel computes, in ``dtype``, what ``Int4Linear.dequantized`` describes."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 2 * _INT4_BLOCK_N, bias=False).to(dtype)
    x = torch.randn(3, 256, generator=g).to(dtype)
    try:
        layer = Int4Linear(linear, group_size=64)
        q = quantize_groups(linear.weight.detach().float(), 64)[0]
        if layer.packed.shape != (q.shape[0], q.shape[1] // 2) or not torch.equal(
            unpack_int4(layer.packed, *q.shape).int(), q
        ):
            return False
        got, want = layer(x).float(), F.linear(x.float(), layer.dequantized())
    except (RuntimeError, AttributeError):  # no such kernel, or not for this dtype
        return False
    return float((got - want).abs().max()) <= 0.02 * float(want.abs().max())


def _int4_group_size(linear: nn.Linear, preferred: int) -> int | None:
    """The largest accepted group size up to ``preferred`` that tiles the layer, if any."""
    N, K = linear.weight.shape
    if N % _INT4_BLOCK_N:
        return None
    return next((g for g in _INT4_GROUP_SIZES if g <= preferred and K % g == 0), None)


def _row_chunks(rows: int, size: int = 64 * _INT4_BLOCK_N) -> list[slice]:
    """Slices of at most ``size`` rows: quantising a chunk at a time keeps the float32
    temporaries small (the LM head in one piece would need several copies of ~0.5 GB).
    ``size`` stays a multiple of the int4 block, which Int4Linear's packing relies on."""
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


# ---- swapping layers ----------------------------------------------------------------------


def replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Replace every ``nn.Linear`` under ``root`` by ``make(linear)``; None keeps it.

    Only the parents are listed up front, never the linears themselves: each replaced
    layer is then freed as soon as it is swapped, instead of every original weight
    staying alive next to its replacement until the end.
    """
    parents = [m for m in root.modules() if any(isinstance(c, nn.Linear) for c in m.children())]
    for module in parents:
        names = [name for name, child in module.named_children() if isinstance(child, nn.Linear)]
        for name in names:
            if (new := make(getattr(module, name))) is not None:
                setattr(module, name, new)


def _swap_linears(model: FastVLMCore, make: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Replace each linear of the decoder, projector and LM head by ``make(linear)``
    (None keeps it)."""
    for root in (model.language_model, model.projector):
        replace_linears(root, make)
    if isinstance(model.lm_head, nn.Linear) and (head := make(model.lm_head)) is not None:
        model.lm_head = head  # a tied embedding keeps its own full-precision table


def quantize_int8(model: FastVLMCore, packed_max_rows: int = 16) -> None:
    """Swap the decoder's, LM head's and projector's linears for ``Int8Linear``."""
    _swap_linears(model, lambda linear: Int8Linear(linear, packed_max_rows))


def quantize_int4(model: FastVLMCore, group_size: int = 64, kernel_max_rows: int = 192) -> None:
    """Swap the decoder's, LM head's and projector's linears for ``Int4Linear``.

    A layer whose shape the kernel cannot tile stays as it is.
    """
    if not _int4_kernel_works(model.dtype):
        raise FastVLMError(
            f"int4 weights do not work with torch {torch.__version__} in {model.dtype}; use int8"
        )

    def make(linear: nn.Linear) -> Int4Linear | None:
        size = _int4_group_size(linear, group_size)
        return Int4Linear(linear, size, kernel_max_rows) if size is not None else None

    _swap_linears(model, make)
