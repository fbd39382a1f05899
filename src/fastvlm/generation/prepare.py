"""Admission checks: a request becomes a ``Sequence`` or fails with a one-line error.

Everything that can go wrong with a request's content (messages, images, length)
goes wrong here, inside ``Engine.add_request`` and before any model compute, so a
server can answer 400 at once instead of failing a batch later.
"""

from __future__ import annotations

import time

import torch

from ..errors import ContextLengthError, InputError
from ..processing.messages import is_batch
from .detokenize import TextStream
from .feature_cache import image_key
from .request import GenerationRequest
from .sequence import Sequence


def prepare_sequence(
    request: GenerationRequest,
    processor,
    *,
    max_seq_len: int,
    device: torch.device,
    default_stop_ids: list[int],
    hash_images: bool,
    added_at: float | None = None,
) -> Sequence:
    """Tokenize ``request``, load its images and check it fits ``max_seq_len`` columns."""
    added_at = time.perf_counter() if added_at is None else added_at
    if is_batch(request.messages):
        raise InputError("messages must be one conversation (a list of messages), not a list of them")
    # The processor checks the model's context before it decodes any image. A budget that
    # will be fitted to the room left cannot overflow it, so then only the prompt must fit.
    checked_budget = 0 if request.fit_to_context else request.max_new_tokens
    inputs = processor.apply_chat_template(
        request.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", max_new_tokens=checked_budget,
    )  # fmt: skip
    ids = inputs["input_ids"][0]  # (T,)
    T = ids.numel()
    if T == 0:
        raise InputError("the prompt is empty; send at least one message with text or an image")
    budget = _new_token_budget(request, T, max_seq_len)
    pixels = inputs.get("pixel_values")
    pixels = pixels if pixels is not None and pixels.shape[0] > 0 else None
    # Hashing costs a pass over the pixels; skip it when nothing would be cached.
    keys = [image_key(px) if hash_images else "" for px in (pixels if pixels is not None else [])]
    p = request.sampling
    generator = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
    history = None
    if p.repetition_penalty != 1.0:
        history = torch.empty(T + budget, dtype=torch.long, device=device)  # (T + budget,)
        history[:T] = ids.to(device)
    stops = request.stop_token_ids if request.stop_token_ids is not None else default_stop_ids
    return Sequence(
        request=request,
        prompt_ids=ids,
        pixels=pixels,
        image_keys=keys,
        stop_ids=frozenset(stops),
        text=TextStream(processor.tokenizer.decode, request.stop),
        max_new_tokens=budget,
        generator=generator,
        history=history,
        added_at=added_at,
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
