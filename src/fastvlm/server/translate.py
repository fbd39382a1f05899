"""An OpenAI chat request -> the engine's ``GenerationRequest``.

Everything the API promises to refuse with a 4xx is refused here, before the request
takes a place in the queue: unknown model, options that would change the answer but
are not honoured, bad token budgets, too much text or too many messages or images
(all bounded before anything is tokenised), text that is not valid Unicode, bad or
oversized images, constraints the grammar compiler cannot enforce. Sampling and output
options are ``decoding``'s, the answer's shape is ``constraints``'. Images become file
bytes (see ``images``); the engine decodes them.
The exact context-length check needs the tokenized prompt, so the engine does that
one (``ContextLengthError`` -> 400); the character bound here keeps that tokenisation
cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from ..errors import InputError
from ..generation.constraint_spec import OutputConstraint
from ..generation.request import GenerationRequest
from ..processing.image_source import ImageLoadOptions
from .constraints import compile_error, output_constraint
from .decoding import output_options, sampling_params
from .errors import APIError, from_input_error
from .images import MAX_IMAGES_PER_REQUEST, MAX_REQUEST_IMAGE_BYTES, image_bytes, server_image_options
from .schemas import MAX_CHOICES, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, ChatCompletionRequest, Message

_ROLES = {"developer": "system"}  # the newer name for a system message

# A Qwen2 token is rarely more than a few characters, and runs of whitespace or
# punctuation merge into at most 16 or so; text longer than this many characters per
# context token cannot fit, so it is refused without being tokenised.
CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Policy:
    """What this server accepts; fixed at startup."""

    served_model_name: str
    context_length: int
    default_max_tokens: int = 512
    images: ImageLoadOptions = server_image_options()
    max_images: int = MAX_IMAGES_PER_REQUEST
    max_image_bytes: int = MAX_REQUEST_IMAGE_BYTES  # all images of one request together
    image_tokens: int = 0  # context tokens each image takes, whatever its size (0: unknown)
    vocab_size: int = 0  # token ids a logit_bias may name (0: unknown, the engine checks)
    max_choices: int = MAX_CHOICES  # n: each choice takes one of the engine's batch rows
    # The engine's grammar compiler (cached), to refuse a constraint it cannot enforce
    # with the field's name; raises InputError. None: the engine's prepare refuses it.
    check_constraint: Callable[[OutputConstraint], Any] | None = None

    @property
    def max_characters(self) -> int:
        return CHARS_PER_TOKEN * self.context_length


# Fields the API has that would change the answer, with the values that change nothing
# ("auto" tool choice without tools is no tool call; ``tools`` itself is refused).
_UNSUPPORTED: list[tuple[str, Callable[[Any], bool], str]] = [
    ("tools", lambda v: not v, "Tool calls are not supported by this server."),
    ("tool_choice", lambda v: v in (None, "none", "auto"), "Tool calls are not supported by this server."),
    ("functions", lambda v: not v, "Function calls are not supported by this server."),
    (
        "function_call",
        lambda v: v in (None, "none", "auto"),
        "Function calls are not supported by this server.",
    ),
    ("audio", lambda v: v is None, "Audio output is not supported by this server."),
    ("modalities", lambda v: v in (None, ["text"]), "Only the 'text' output modality is supported."),
    ("prediction", lambda v: v is None, "Predicted outputs are not supported by this server."),
    ("web_search_options", lambda v: v is None, "Web search is not supported by this server."),
    (
        "guided_grammar",
        lambda v: v is None,
        "guided_grammar is not supported; use guided_json, guided_regex, guided_choice or response_format.",
    ),
    (
        "guided_whitespace_pattern",
        lambda v: v is None,
        "guided_whitespace_pattern is not supported: constrained JSON is always compact.",
    ),
    (
        "structured_outputs",
        lambda v: v is None,
        "structured_outputs is not supported; use response_format or a guided_json/regex/choice field.",
    ),
]


async def to_generation_request(
    body: ChatCompletionRequest, policy: Policy, http: httpx.AsyncClient | None = None
) -> GenerationRequest:
    if body.model != policy.served_model_name:
        raise APIError(
            404,
            f"The model {body.model[:100]!r} does not exist; "
            f"this server serves {policy.served_model_name!r}.",
            param="model",
            code="model_not_found",
        )
    _refuse_unsupported(body)
    _check_text(body, policy)
    max_new_tokens, stop = _max_new_tokens(body, policy), _stop_strings(body)
    sampling = sampling_params(body, policy.vocab_size)
    options = output_options(body, policy.max_choices)
    constraint = await _constraint(body, policy)
    _check_image_room(body, policy)
    # Images last: they cost the most to check.
    messages = [await _message(m, i, policy.images, http) for i, m in enumerate(body.messages)]
    _check_image_bytes(messages, policy)
    try:
        return GenerationRequest(
            messages=messages,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=stop,
            stop_token_ids=[] if body.ignore_eos else None,
            # The server's default budget shrinks to fit a long prompt; an asked one does not.
            fit_to_context=body.requested_max_tokens()[0] is None,
            constraint=constraint,
            **options,
        )
    except InputError as exc:
        raise from_input_error(exc, param=None) from exc


async def _constraint(body: ChatCompletionRequest, policy: Policy) -> OutputConstraint | None:
    constraint, param = output_constraint(body)
    if constraint is None or policy.check_constraint is None:
        return constraint
    try:  # compiling is CPU work: off the event loop
        await anyio.to_thread.run_sync(policy.check_constraint, constraint)
    except InputError as exc:
        raise compile_error(exc, param) from exc
    return constraint


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    for name, harmless, message in _UNSUPPORTED:
        if not harmless(getattr(body, name)):
            raise APIError(400, message, param=name, code="unsupported_parameter")


def _texts(body: ChatCompletionRequest) -> Iterator[tuple[str, str]]:
    """(text, param) for every piece of text in the messages."""
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            yield message.content, f"messages[{i}].content"
        elif message.content is not None:
            for j, part in enumerate(message.content):
                if part.type == "text":
                    yield part.text, f"messages[{i}].content[{j}].text"


def _check_text(body: ChatCompletionRequest, policy: Policy) -> None:
    """Bound the work before anything is tokenised: images and characters (the schema
    bounds the number of messages and parts)."""
    images = _count_images(body)
    if images > policy.max_images:
        raise APIError(
            400,
            f"The request has {images} images; this server accepts at most {policy.max_images}.",
            param="messages",
            code="too_many_images",
        )
    texts = list(_texts(body))
    characters = sum(len(text) for text, _ in texts)
    if characters > policy.max_characters:
        raise APIError(
            400,
            f"The messages hold {characters} characters; at most {policy.max_characters} are accepted "
            f"({CHARS_PER_TOKEN} per token of the {policy.context_length}-token context). Shorten them.",
            param="messages",
            code="context_length_exceeded",
        )
    for text, param in [*texts, *((s, "stop") for s in body.stop_list()), (body.model, "model")]:
        _check_unicode(text, param)


def _count_images(body: ChatCompletionRequest) -> int:
    """Images in all messages: each user turn may carry several, and earlier turns keep theirs."""
    parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content]
    return sum(p.type == "image_url" for p in parts)


def _check_image_room(body: ChatCompletionRequest, policy: Policy) -> None:
    """Every image takes the same number of context tokens whatever its size, so images
    that cannot fit with the asked budget are refused before any is fetched or decoded.
    The exact check (text included) is the engine's, also before decoding."""
    images = _count_images(body)
    taken = images * policy.image_tokens
    asked = body.requested_max_tokens()[0] or 0
    if not images or taken + asked <= policy.context_length:
        return
    budget = f" plus {asked} new tokens" if asked else ""
    raise APIError(
        400,
        f"The request's {images} images take {taken} tokens ({policy.image_tokens} each){budget}, over the "
        f"{policy.context_length}-token context; send fewer images (earlier turns count too), "
        "start a new conversation or ask for fewer new tokens.",
        param="messages",
        code="context_length_exceeded",
    )


def _check_unicode(text: str, param: str) -> None:
    # JSON can spell a lone UTF-16 surrogate ("\ud800"); no tokenizer can encode it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(
            400,
            f"'{param}' contains an unpaired UTF-16 surrogate ({text[exc.start]!r} at character "
            f"{exc.start}); send valid Unicode text.",
            param=param,
            code="invalid_value",
        ) from None


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
    # Every new token is matched against every stop string: keep that cheap.
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(
            400,
            f"A stop sequence may have at most {MAX_STOP_CHARS} characters.",
            param="stop",
            code="invalid_value",
        )
    return stop


def _check_image_bytes(messages: list[dict], policy: Policy) -> None:
    """A queued request holds its images' bytes: bound them per request, fetched ones too."""
    total = sum(
        len(p["image"])
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if "image" in p
    )
    if total > policy.max_image_bytes:
        raise APIError(
            413,
            f"The request's images total {total / 2**20:.1f} MB; "
            f"at most {policy.max_image_bytes / 2**20:.1f} MB are accepted.",
            param="messages",
            code="image_too_large",
        )


async def _message(message: Message, index: int, options: ImageLoadOptions, http) -> dict:
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
        parts.append({"type": "image", "image": await image_bytes(part.image_url.url, options, http, param)})
    return {"role": role, "content": parts}
