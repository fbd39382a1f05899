"""FastVLM in plain PyTorch: faithful, fast, and easy to run and serve."""

from .config import FastVLMConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ContextLengthError, FastVLMError, InputError
from .models.fastvlm import FastVLM

__all__ = [
    "FastVLM",
    "FastVLMConfig",
    "TextConfig",
    "VisionConfig",
    "FastVLMError",
    "CheckpointError",
    "InputError",
    "ContextLengthError",
]
__version__ = "0.1.0"

# The high-level API and the types it returns.
from .api import VLM, load  # noqa: E402
from .generation.engine import (  # noqa: E402
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamEvent,
    Timings,
    Usage,
)

__all__ += [
    "load",
    "VLM",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "StreamEvent",
    "Timings",
    "Usage",
]
