"""An OpenAI chat request -> the engine's ``GenerationRequest``.

Everything the API promises to refuse with a 4xx is refused here, before the request
takes a place in the queue: unknown model, unsupported options, bad token budgets,
bad or oversized images. Images become file bytes (see ``images``); the engine
decodes them in the worker. The context-length check needs the tokenized prompt, so
the engine does that one (``ContextLengthError`` -> 400).
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import httpx

from ..errors import InputError
from ..generation.request import GenerationRequest
from ..generation.sampling import SamplingParams
from .errors import APIError, from_input_error
from .images import ImageLimits, check_image, decode_data_uri, fetch_image, is_remote
from .schemas import MAX_STOP_SEQUENCES, ChatCompletionRequest, Message

_ROLES = {"developer": "system"}  # the newer name for a system message


@dataclass(frozen=True)
class Policy:
    """What this server accepts; fixed at startup."""

    served_model_name: str
    context_length: int
    default_max_tokens: int = 512
    images: ImageLimits = ImageLimits()


async def to_generation_request(
    body: ChatCompletionRequest, policy: Policy, http: httpx.AsyncClient | None = None
) -> GenerationRequest:
    if body.model != policy.served_model_name:
        raise APIError(
            404,
            f"The model {body.model!r} does not exist; this server serves {policy.served_model_name!r}.",
            param="model",
            code="model_not_found",
        )
    _refuse_unsupported(body)
    max_new_tokens, sampling, stop = _max_new_tokens(body, policy), _sampling(body), _stop_strings(body)
    # Images last: they cost the most to check.
    messages = [await _message(m, i, policy.images, http) for i, m in enumerate(body.messages)]
    try:
        return GenerationRequest(
            messages=messages,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stop,
            stop_token_ids=[] if body.ignore_eos else None,
            # The server's default budget shrinks to fit a long prompt; an asked one does not.
            fit_to_context=body.requested_max_tokens()[0] is None,
        )
    except InputError as exc:
        raise from_input_error(exc, param=None) from exc


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n", code="invalid_value")
    if body.tools:
        raise APIError(
            400, "Tool calls are not supported by this server.", param="tools", code="invalid_value"
        )
    if body.logprobs:
        raise APIError(
            400, "logprobs are not supported by this server.", param="logprobs", code="invalid_value"
        )


def _max_new_tokens(body: ChatCompletionRequest, policy: Policy) -> int:
    asked, param = body.requested_max_tokens()
    if asked is None:
        return policy.default_max_tokens
    if not 1 <= asked <= policy.context_length:
        raise APIError(
            400,
            f"'{param}' must be between 1 and the context length {policy.context_length}; got {asked}.",
            param=param,
            code="invalid_value",
        )
    return asked


def _stop_strings(body: ChatCompletionRequest) -> list[str]:
    stop = body.stop_list()
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(
            400,
            f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.",
            param="stop",
            code="invalid_value",
        )
    return stop


def _sampling(body: ChatCompletionRequest) -> SamplingParams:
    """OpenAI's defaults (temperature 1, top_p 1) where the request is silent."""
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
        )
    except InputError as exc:
        raise from_input_error(exc, param=None) from exc


async def _message(message: Message, index: int, limits: ImageLimits, http) -> dict:
    role = _ROLES.get(message.role, message.role)
    content = message.content
    if content is None or isinstance(content, str):
        return {"role": role, "content": content or ""}
    parts = []
    for j, part in enumerate(content):
        if part.type == "text":
            parts.append({"type": "text", "text": part.text})
            continue
        param = f"messages[{index}].content[{j}].image_url"
        parts.append({"type": "image", "image": await _image_bytes(part.image_url.url, limits, http, param)})
    return {"role": role, "content": parts}


async def _image_bytes(url: str, limits: ImageLimits, http, param: str) -> bytes:
    if is_remote(url) and limits.allow_remote:
        if http is None:
            raise APIError(
                400, "Remote images are not available.", param=param, code="remote_images_disabled"
            )
        data = await fetch_image(url, limits, http, param)
        return await anyio.to_thread.run_sync(check_image, data, limits, param)
    # Decoding base64 (up to 20 MB) is CPU work: keep it off the event loop.
    return await anyio.to_thread.run_sync(decode_data_uri, url, limits, param)
