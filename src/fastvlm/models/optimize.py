"""Speed-ups applied to a loaded model, each behind its own switch.

The modules of this package are built plain (the reference) and loaded that way;
``optimize`` is the one place that switches them to their fast forms, and each switch
shows in ``repr(model)``: ``FusedAttention`` and ``FusedMLP`` layers, the vision
tower's ``channels_last`` and ``compiled`` flags, ``Int8Linear``/``Int4Linear`` and
``TransposedLinear`` layers. Tests hold every fast form to the plain one.
``optimize`` with every switch off leaves the model exactly as loaded.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import FastVLMError
from .attention import IMPLEMENTATIONS
from .fastvithd import Attention as VisionAttention
from .quantize import quantize_int4, quantize_int8, replace_linears
from .qwen2 import fuse_projections

if TYPE_CHECKING:
    from .fastvlm import FastVLMCore


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
    # The decoder's multi-token attention kernel: "sdpa", "eager" (plain matmuls, the slow
    # reference) or "flash_attention_2" (flash-attn on CUDA; SDPA where it cannot run).
    attention: str = "sdpa"
    vision_attention: str = "sdpa"  # the vision tower's: "sdpa" or "eager"

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


def optimize(model: FastVLMCore, options: SpeedOptions = SpeedOptions()) -> FastVLMCore:
    """Apply ``options`` to ``model`` in place and return it. Applying them twice is harmless."""
    _check_options(model, options)
    if options.fuse_projections:
        for layer in model.language_model.layers:
            fuse_projections(layer)
    for layer in model.language_model.layers:
        layer.self_attn.implementation = options.attention
    for module in model.vision_tower.modules():
        if isinstance(module, VisionAttention):
            module.implementation = options.vision_attention
    tower = model.vision_tower
    if options.channels_last and not tower.channels_last:
        tower.to(memory_format=torch.channels_last)
        tower.channels_last = True
    if options.int8:
        quantize_int8(model)
    elif options.int4:
        quantize_int4(model)
    elif options.transposed_fp32 and model.dtype == torch.float32 and model.device.type == "cpu":
        transpose_linears(model)
    if options.compile_vision and tower.compiled is None:
        tower.compiled = CompiledWithFallback(tower.features)
    _return_freed_memory()
    return model


def _check_options(model: FastVLMCore, options: SpeedOptions) -> None:
    """Refuse what cannot work before anything is changed, so a refusal leaves the model as it was."""
    if options.int8 and options.int4:
        raise FastVLMError("choose int8 or int4 weights, not both")
    if options.attention not in IMPLEMENTATIONS:
        raise FastVLMError(f"attention {options.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if options.vision_attention not in ("sdpa", "eager"):
        raise FastVLMError(f"vision_attention {options.vision_attention!r} is not 'sdpa' or 'eager'")
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


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compile raises: dynamo and inductor errors, a missing or broken C++
    compiler, a missing Triton. Anything else (out of memory, a bad input) is a real error."""
    from torch._dynamo import exc as dynamo
    from torch._inductor import exc as inductor

    return (
        dynamo.TorchDynamoException,
        dynamo.TritonUnavailableError,
        inductor.CppCompileError,
        inductor.InvalidCxxCompiler,
        inductor.OperatorIssue,
    )


class CompiledWithFallback:
    """Run a function through torch.compile; if compiling fails, say why once and stay eager.

    ``compile_seconds`` records the first (compiling) call, so it can be reported apart
    from steady-state timings. The compiled graph is cached by torch per input shape, so
    a new shape compiles again, and may fail then too.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False)
        self.failed: str | None = None  # why compiling failed, once it has
        self.compile_seconds: float | None = None
        self._errors = _compile_errors()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.fn(x)
        import torch._inductor.config as inductor_config
        from torch._dynamo.exc import TorchRuntimeError

        start = time.perf_counter()
        try:
            # Freezing lets inductor treat weights as constants and fuse conv + GELU.
            with inductor_config.patch(freezing=True):
                out = self.compiled(x)
        except TorchRuntimeError:
            raise  # the traced code itself failed (a bad input): eager would fail the same way
        except self._errors as exc:
            self.failed = _first_line(exc)
            warnings.warn(f"torch.compile failed ({self.failed}); running eagerly", stacklevel=2)
            return self.fn(x)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
        return out

    def __repr__(self) -> str:
        state = f"failed: {self.failed}" if self.failed else "compiled"
        return f"CompiledWithFallback({getattr(self.fn, '__qualname__', self.fn)}, {state})"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) view nn.Linear has, for code that reads ``lm_head.weight``."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        n_in, n_out = self.weight_t.shape
        return f"in_features={n_in}, out_features={n_out}, bias={self.bias is not None}"


def _transposed(linear: nn.Linear) -> TransposedLinear:
    return TransposedLinear(linear.weight.detach().t().contiguous(), linear.bias)


def transpose_linears(model: FastVLMCore) -> None:
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
