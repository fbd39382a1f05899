"""Activation functions named as transformers names them in config.json.

``hidden_act`` (the decoder's MLP) and ``projector_hidden_act`` (the projector) are
looked up here. The table is explicit on purpose: a name we do not know is refused
in one line rather than silently replaced by SiLU or GELU, which would load and run
but give other logits. Each entry computes what transformers' ``ACT2FN`` entry does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import CheckpointError

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation written out, as GPT-2 (and transformers' NewGELUActivation) has it.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "linear": lambda x: x,
}


def activation(name: str, what: str) -> Activation:
    """The function for ``name``; CheckpointError naming ``what`` (the config field) if unknown."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"config.json: {what} {name!r} is not supported; use one of {', '.join(sorted(ACTIVATIONS))}"
        ) from None
