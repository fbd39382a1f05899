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
