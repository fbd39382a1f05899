"""Speed-ups applied to a loaded model, each behind its own switch.

The modules in this package stay plain and are the reference; everything here
rewrites a loaded model in place (fusing projections, changing memory layout,
quantising weights) and is tested against the untouched model. ``optimize`` with
every switch off leaves the model exactly as loaded.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import FastVLMError
from .quantize import quantize_int4, quantize_int8
from .qwen2 import MLP, Attention
from .swap import replace_linears

if TYPE_CHECKING:
    from .fastvlm import FastVLM


@dataclass(frozen=True)
class SpeedOptions:
    fuse_projections: bool = True  # one q|k|v matmul and one gate|up matmul per layer
    channels_last: bool = True  # NHWC convolutions in the vision tower (oneDNN and cuDNN favour it)
    int8: bool = False  # weight-only int8 for the decoder, the LM head and the projector
    int4: bool = False  # the same with 4-bit weights in groups of 64 (CPU kernel; faster, coarser)
    # torch.compile the vision tower (inductor, frozen weights: convolutions fused with
    # their GELU). Pays a compile per new batch size; falls back to eager if compiling fails.
    compile_vision: bool = False
    # float32 on CPU: store decoder weights as (in, out), which decoding reads faster.
    transposed_fp32: bool = True

    @classmethod
    def off(cls) -> SpeedOptions:
        """Every switch off: the plain reference modules, exactly as loaded."""
        return cls(
            fuse_projections=False,
            channels_last=False,
            int8=False,
            int4=False,
            compile_vision=False,
            transposed_fp32=False,
        )


def optimize(model: FastVLM, options: SpeedOptions = SpeedOptions()) -> FastVLM:
    """Apply ``options`` to ``model`` in place and return it."""
    _check_options(model, options)
    if options.fuse_projections:
        fuse_projections(model.language_model)
    if options.channels_last:
        model.vision_tower.to(memory_format=torch.channels_last)
        model.vision_channels_last = True
    if options.int8:
        quantize_int8(model)
    elif options.int4:
        quantize_int4(model)
    elif options.transposed_fp32 and model.dtype == torch.float32 and model.device.type == "cpu":
        transpose_linears(model)
    if options.compile_vision:
        model.vision_forward = CompiledWithFallback(model.vision_tower)
    _return_freed_memory()
    return model


def _check_options(model: FastVLM, options: SpeedOptions) -> None:
    """Refuse what cannot work before anything is changed, so a refusal leaves the model as it was."""
    if options.int8 and options.int4:
        raise FastVLMError("choose int8 or int4 weights, not both")
    if not (options.int8 or options.int4):
        return
    bits = "int8" if options.int8 else "int4"
    if model.device.type != "cpu":
        raise FastVLMError(
            f"{bits} weights are a CPU option (their kernels are CPU-only); on {model.device.type} "
            "run the model in its own dtype"
        )
    if isinstance(model.lm_head, TransposedLinear):
        raise FastVLMError(
            f"this float32 model was already optimised with transposed weights; apply {bits} "
            "to a freshly loaded model"
        )


def _return_freed_memory() -> None:
    """Hand the buffers that fusing, re-layout and quantising replaced back to the OS.

    glibc keeps freed heap chunks for reuse, so without this the weights' old
    copies stay in the resident set (~60 MB for 0.5B) long after they are gone.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass


class CompiledWithFallback:
    """Run a module through torch.compile; on any compile failure warn once and stay eager.

    ``compile_seconds`` records the first (compiling) call, so it can be reported apart
    from steady-state timings. The compiled graph is cached by torch per input shape.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.compiled = torch.compile(module, dynamic=False)
        self.failed = False
        self.compile_seconds: float | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.module(x)
        import torch._inductor.config as inductor_config

        start = time.perf_counter()
        try:
            # Freezing lets inductor treat weights as constants and fuse conv + GELU.
            with inductor_config.patch(freezing=True):
                out = self.compiled(x)
        except Exception as exc:  # no C++ compiler, unsupported backend, ...
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {exc}); running eagerly", stacklevel=2
            )
            self.failed = True
            return self.module(x)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
        return out


class FusedLinear(nn.Module):
    """Several linears on the same input as one matmul; the output is split back into
    parts of ``sizes`` (default: one per linear)."""

    def __init__(self, linears: list[nn.Linear], sizes: list[int] | None = None) -> None:
        super().__init__()
        self.sizes = sizes or [lin.out_features for lin in linears]
        weight = torch.cat([lin.weight for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b if b is not None else torch.zeros_like(lin.weight[:, 0])
                    for b, lin in zip(biases, linears, strict=True)
                ]
            )
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.linear.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def fuse_projections(lm: nn.Module) -> None:
    """Give each attention a ``qkv_proj`` and each MLP a ``gate_up_proj`` (they prefer them)."""
    for module in lm.modules():
        # Only plain nn.Linear projections are fused (not already fused, transposed or int8).
        if isinstance(module, Attention) and isinstance(getattr(module, "q_proj", None), nn.Linear):
            # Split as q|k and v, the two parts Attention.project returns.
            qk_size = module.q_proj.out_features + module.k_proj.out_features
            module.qkv_proj = FusedLinear(
                [module.q_proj, module.k_proj, module.v_proj], [qk_size, module.v_proj.out_features]
            )
            del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, MLP) and isinstance(getattr(module, "gate_proj", None), nn.Linear):
            module.gate_up_proj = FusedLinear([module.gate_proj, module.up_proj])
            del module.gate_proj, module.up_proj


# ---- float32 weight layout -----------------------------------------------------------


class TransposedLinear(nn.Module):
    """y = x @ Wt + b with the weight stored transposed, (in, out) and contiguous.

    On CPU, float32 matrix-vector products (decoding) read an (in, out) matrix at
    ~30 GB/s and an (out, in) one at ~17-20 GB/s on the machines we measured; bf16
    and prefill matrix-matrix products do not care.
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def _transposed(linear: nn.Linear) -> TransposedLinear:
    return TransposedLinear(linear.weight.detach().t().contiguous(), linear.bias)


def transpose_linears(model) -> None:
    """Swap the decoder's linears and the LM head for ``TransposedLinear``."""
    if isinstance(model.lm_head, TransposedLinear):
        return  # already done
    embed = model.language_model.embed_tokens
    tied = model.lm_head.weight is embed.weight
    replace_linears(model.language_model, _transposed)
    model.lm_head = _transposed(model.lm_head)
    if tied:
        # Keep one copy: the embedding reads rows of the transposed head through a view.
        embed.weight = nn.Parameter(model.lm_head.weight_t.t(), requires_grad=False)
