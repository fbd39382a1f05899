"""FastVLM in plain PyTorch: faithful, fast, and easy to run and serve."""

from .api import VLM, load
from .batch import run_batch as run_batch  # a public name, like those in __all__
from .config import FastVLMConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ContextLengthError, FastVLMError, InputError
from .generation.constraint_spec import OutputConstraint
from .generation.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamEvent,
    Timings,
    Usage,
)
from .modeling import FastVLM
from .models.optimize import SpeedOptions
from .processing import FastVLMProcessor
from .results import ChatResult

__all__ = [
    "load",
    "VLM",
    "FastVLM",
    "FastVLMProcessor",
    "FastVLMConfig",
    "TextConfig",
    "VisionConfig",
    "SpeedOptions",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "ChatResult",
    "OutputConstraint",
    "SamplingParams",
    "StreamEvent",
    "Timings",
    "Usage",
    "FastVLMError",
    "CheckpointError",
    "InputError",
    "ContextLengthError",
]
__version__ = "0.1.0"
