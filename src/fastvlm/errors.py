"""Exceptions that carry a one-line, user-facing message.

Every error a user can cause (bad checkpoint, bad image, prompt too long, bad
option) is raised as one of these, so the CLI and the server can report it
without a traceback.
"""

from __future__ import annotations


class FastVLMError(ValueError):
    """Base class: the message says what was wrong and what to do."""


class CheckpointError(FastVLMError):
    """A checkpoint folder, hub id, config or weight file is unusable."""


class InputError(FastVLMError):
    """A request's content (image, text, option) is unusable."""


class ContextLengthError(InputError):
    """A prompt (plus requested new tokens) does not fit the model's context."""
