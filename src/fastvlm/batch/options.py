"""A batch job's options: one typed record, checked before anything is loaded.

The fields are the ``fastvlm batch`` flags; ``run_batch`` takes them as keywords.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..checkpoints.hub import DEFAULT_MODEL
from ..errors import InputError
from .inputs import Columns

DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class BatchOptions:
    """A whole job. ``ray``: None runs locally; "local" starts Ray here; "auto" or an address joins."""

    inputs: tuple[str, ...]
    output: str
    prompt: str = DEFAULT_PROMPT
    model: str = DEFAULT_MODEL
    image_column: str = "image"
    prompt_column: str | None = None  # None: "prompt" if the table has it
    id_column: str | None = None  # None: the row number (tables) or relative path (folders)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # At most one constraint on every answer (see OutputConstraint); adds columns to the output.
    json_schema: dict | None = None
    regex: str | None = None
    choices: tuple[str, ...] | None = None
    device: str = "auto"
    dtype: str = "auto"
    int8: bool = False
    int4: bool = False
    adapter: str | None = None  # a LoRA adapter folder merged into the weights at load
    max_batch: int = 8
    ray: str | bool | None = None
    workers: int = 1
    allow_remote_images: bool = False
    max_image_pixels: int | None = None  # None: the processor's limit
    progress: bool = True
    commit_every: int = 32  # rows per part file: a kill loses at most these (or 10 s of work)
    ray_remote_args: dict[str, Any] = field(default_factory=dict)  # extra options for the model actors

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            object.__setattr__(self, "inputs", (str(self.inputs),))
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        if isinstance(self.ray, bool):  # run_batch(..., ray=True) from Python
            object.__setattr__(self, "ray", "local" if self.ray else None)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or ()
        object.__setattr__(self, "stop", tuple(stop))
        if self.choices is not None:
            choices = [self.choices] if isinstance(self.choices, str) else self.choices
            object.__setattr__(self, "choices", tuple(choices))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("the prompt must be non-empty text; pass --prompt TEXT")
        if self.int8 and self.int4:
            raise InputError("pick one of int8 and int4")
        for name in ("max_batch", "workers", "commit_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise InputError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")

    @property
    def generation(self) -> dict[str, Any]:
        """The keyword options of ``vlm.ask`` this job passes for every row."""
        keys = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "json_schema", "regex", "choices")
        options = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        return {**options, "stop": list(self.stop)} if self.stop else options

    @property
    def columns(self) -> Columns:
        given = self.prompt_column is not None
        return Columns(self.image_column, self.prompt_column or "prompt", self.id_column, given)


def load_model(opts: BatchOptions, device: str | None = None):
    from ..api import load
    from ..models.optimize import SpeedOptions

    return load(
        opts.model,
        device=device or opts.device,
        dtype=opts.dtype,
        max_batch=opts.max_batch,
        progress=False,
        speed=SpeedOptions(int8=opts.int8, int4=opts.int4),
        adapter=opts.adapter,
    )


def image_load_options(processor, opts: BatchOptions):
    """The processor's image limits, with remote fetches only when the job allows them."""
    options = replace(processor.image_options, allow_remote=opts.allow_remote_images, allow_local_files=True)
    if opts.max_image_pixels is not None:
        options = replace(options, max_pixels=opts.max_image_pixels)
    return options
