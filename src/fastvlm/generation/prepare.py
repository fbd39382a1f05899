"""Admission checks and preparation: a request becomes a ``PreparedRequest`` or fails
with a one-line error.

Everything that can go wrong with a request's content (messages, images, length)
goes wrong here, before any model compute, so a server can answer 400 at once
instead of failing a batch later. Preparation is pure CPU work (template, tokenizer,
image decoding, resizing, hashing) and touches no engine state: it is safe to run on
any thread, so a server runs it beside the engine, never on the engine's thread.

Images stay uint8 (resized and cropped) until their request is admitted: a queued
request holds a quarter of what float32 pixels would take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, InputError
from ..processing.messages import is_batch
from .constraints import CompiledGrammar
from .feature_cache import image_key
from .request import GenerationRequest

DEFAULT_MAX_IMAGES = 8


@dataclass(frozen=True)
class PrepareLimits:
    """What one request may ask of an engine; fixed when the engine is built."""

    max_seq_len: int
    max_images: int = DEFAULT_MAX_IMAGES
    # No token is longer than this many characters, so a prompt with more characters
    # than max_seq_len * max_token_chars cannot fit: refuse it before tokenizing it.
    max_token_chars: int = 128
    hash_images: bool = True  # only worth its pass over the pixels when a cache will use it


@dataclass
class PreparedRequest:
    request: GenerationRequest
    prompt_ids: torch.Tensor  # (T,) int64 on CPU, image placeholders expanded
    pixels: torch.Tensor | None  # (n_images, 3, S, S) uint8, in prompt order
    image_keys: list[str]  # feature-cache key of each image ("" = do not cache)
    max_new_tokens: int  # the request's budget, fitted to the context when it asked for that
    added_at: float = field(default_factory=time.perf_counter)
    grammar: CompiledGrammar | None = None  # the request's constraint, compiled

    @property
    def request_id(self) -> str:
        return self.request.request_id


def prepare_request(request: GenerationRequest, processor, limits: PrepareLimits) -> PreparedRequest:
    """Tokenize ``request``, load its images and check it fits ``limits``."""
    added_at = time.perf_counter()
    if is_batch(request.messages):
        raise InputError("messages must be one conversation (a list of messages), not a list of them")
    _check_size(request.messages, limits)
    # The processor checks the model's context before it decodes any image. A budget that
    # will be fitted to the room left cannot overflow it, so then only the prompt must fit.
    checked_budget = 0 if request.fit_to_context else request.max_new_tokens
    inputs = processor.apply_chat_template(
        request.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", max_new_tokens=checked_budget, uint8_pixels=True,
    )  # fmt: skip
    ids = inputs["input_ids"][0]  # (T,)
    T = ids.numel()
    if T == 0:
        raise InputError("the prompt is empty; send at least one message with text or an image")
    budget = _new_token_budget(request, T, limits.max_seq_len)
    pixels = inputs.get("pixel_values")
    pixels = pixels if pixels is not None and pixels.shape[0] > 0 else None
    images = pixels if pixels is not None else []
    keys = [image_key(px) if limits.hash_images else "" for px in images]
    return PreparedRequest(request, ids, pixels, keys, budget, added_at)


def _check_size(messages, limits: PrepareLimits) -> None:
    """Cheap bounds on what would be costly to find out: image count and prompt characters."""
    if not isinstance(messages, list):
        return  # the processor says what is wrong with it
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    parts = [p for c in contents if isinstance(c, list) for p in c if isinstance(p, dict)]
    images = sum(1 for p in parts if p.get("type") in ("image", "image_url"))
    if images > limits.max_images:
        raise InputError(
            f"the conversation has {images} images; this engine takes at most {limits.max_images} per request"
        )
    texts = [c for c in contents if isinstance(c, str)] + [p.get("text") for p in parts]
    chars = sum(len(t) for t in texts if isinstance(t, str))
    if chars > limits.max_seq_len * limits.max_token_chars:
        raise ContextLengthError(
            f"the conversation has {chars} characters, more than fit this engine's limit of "
            f"{limits.max_seq_len} tokens; shorten the conversation"
        )


def _new_token_budget(request: GenerationRequest, num_prompt_tokens: int, max_seq_len: int) -> int:
    """``max_new_tokens``, lowered to the room after the prompt when the request allows it.

    Raises ContextLengthError when the prompt and budget do not fit ``max_seq_len``.
    """
    budget = request.max_new_tokens
    room = max_seq_len - num_prompt_tokens
    if request.fit_to_context:
        if room < 1:  # the caller asked for no particular budget: the prompt alone is too long
            raise ContextLengthError(
                f"the prompt is {num_prompt_tokens} tokens, leaving no room under this engine's "
                f"limit of {max_seq_len} tokens; shorten the conversation"
            )
        budget = min(budget, room)
    if num_prompt_tokens + budget > max_seq_len:
        raise ContextLengthError(
            f"the prompt is {num_prompt_tokens} tokens plus {budget} new tokens, over this engine's "
            f"limit of {max_seq_len} tokens; shorten the conversation or ask for fewer new tokens"
        )
    return budget
