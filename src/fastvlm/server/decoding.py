"""How a request asks to pick tokens -> ``SamplingParams`` and the request's output options.

OpenAI's sampling fields with OpenAI's defaults where the request is silent
(temperature 1, top_p 1), its ``presence_penalty``, ``frequency_penalty`` and
``logit_bias`` (token ids arrive as JSON strings), ``logprobs`` with ``top_logprobs``
and ``n``; plus vLLM's ``top_k``, ``min_p`` and ``repetition_penalty``. Ranges that
need no model are the schema's; token ids are checked against the vocabulary here.
"""

from __future__ import annotations

from ..errors import InputError
from ..generation.sampling import SamplingParams
from .errors import APIError, from_input_error
from .schemas import MAX_CHOICES, ChatCompletionRequest


def sampling_params(body: ChatCompletionRequest, vocab_size: int = 0) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=logit_bias(body, vocab_size),
        )
    except InputError as exc:
        raise from_input_error(exc, param=None) from exc


def logit_bias(body: ChatCompletionRequest, vocab_size: int = 0) -> dict[int, float] | None:
    """``{"50256": -100}`` -> ``{50256: -100.0}``; a key that is no token id is a 400."""
    if not body.logit_bias:
        return None
    out = {}
    for key, bias in body.logit_bias.items():
        token = key.strip()
        if not token.isascii() or not token.isdigit() or len(token) > 12:
            raise APIError(
                400,
                "'logit_bias' keys must be token ids (integers >= 0, as strings like \"50256\"); "
                f"got {key[:40]!r}.",
                param="logit_bias",
                code="invalid_value",
            )
        if vocab_size and int(token) >= vocab_size:
            raise APIError(
                400,
                f"'logit_bias' has token id {token}; this model's token ids go from 0 to {vocab_size - 1}.",
                param="logit_bias",
                code="invalid_value",
            )
        out[int(token)] = float(bias)
    return out


def output_options(body: ChatCompletionRequest, max_choices: int = MAX_CHOICES) -> dict:
    """The ``GenerationRequest`` fields for ``logprobs``, ``top_logprobs`` and ``n``
    (each choice takes a batch row: at most ``max_choices``)."""
    if (body.n or 1) > max_choices:
        raise APIError(
            400,
            f"'n' is {body.n}; this server decodes at most {max_choices} choices at once (its batch size).",
            param="n",
            code="invalid_value",
        )
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError(
            400,
            "'top_logprobs' needs 'logprobs': true.",
            param="top_logprobs",
            code="invalid_value",
        )
    return {"logprobs": bool(body.logprobs), "top_logprobs": top, "n": body.n or 1}
