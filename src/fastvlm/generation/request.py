"""What goes into the engine and what comes out: requests, results and stream events.

Plain data only. Nothing here touches tensors, the model or the tokenizer, so the
server can build and read these without knowing how generation works.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from ..errors import InputError
from .constraint_spec import OutputConstraint
from .sampling import SamplingParams
from .scores import MAX_TOP_LOGPROBS

MAX_CHOICES = 8  # n: answers decoded from one prefill

FinishReason = Literal["stop", "length", "cancelled", "error"]


def _new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerationRequest:
    """One conversation to continue.

    ``messages`` are chat messages as the processor takes them (content is a string or
    a list of text/image parts). ``stop_token_ids=None`` means the checkpoint's
    end-of-sequence ids plus ``<|im_end|>`` and ``<|endoftext|>``. With
    ``fit_to_context``, ``max_new_tokens`` is a ceiling the caller did not insist on
    (a server's default): the engine lowers it to the room left after the prompt.
    ``constraint`` restricts the answer to a JSON schema, a regex or a choice; stop
    strings and ids still apply on top of it.
    """

    messages: list[dict]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    request_id: str = field(default_factory=_new_request_id)
    fit_to_context: bool = False
    constraint: OutputConstraint | None = None
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives (0..20; needs logprobs)
    n: int = 1  # answers to the same prompt (1..8), sharing its prefill; see Engine

    def __post_init__(self) -> None:
        _check_logprobs(self)
        _check_choices(self.n)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InputError(f"max_new_tokens must be an integer, not {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.fit_to_context, bool):
            raise InputError("fit_to_context must be True or False")
        if not isinstance(self.sampling, SamplingParams):
            raise InputError("sampling must be a SamplingParams")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) for s in self.stop):
            raise InputError("stop must be a string or a list of strings")
        self.stop = [s for s in self.stop if s]  # an empty stop string would match at once
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InputError("stop_token_ids must be a list of integers")
            self.stop_token_ids = ids
        if self.constraint is not None and not isinstance(self.constraint, OutputConstraint):
            raise InputError("constraint must be an OutputConstraint or None")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InputError("request_id must be a non-empty string")


def _check_logprobs(request: GenerationRequest) -> None:
    if not isinstance(request.logprobs, bool):
        raise InputError(f"logprobs must be True or False, not {request.logprobs!r}")
    k = request.top_logprobs
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise InputError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
    if k and not request.logprobs:
        raise InputError("top_logprobs needs logprobs=True")


def _check_choices(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InputError(f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}")


@dataclass
class TopLogprob:
    """A token and its log-probability (see ``sampling`` for which distribution).

    ``token`` is its text; ``bytes`` its exact UTF-8 bytes, which differ from the text's
    when the token holds part of a character (then ``token`` shows ``\\xNN`` escapes).
    """

    token_id: int
    token: str
    bytes: list[int]
    logprob: float


@dataclass
class TokenLogprob(TopLogprob):
    """A generated token, with the most likely tokens at its position (best first)."""

    top: list[TopLogprob]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class Timings:
    """Seconds, measured on the engine's clock (``time.perf_counter``).

    ``queue_s``: add_request -> admission (prefill start). ``ttft_s``: admission -> first
    token, i.e. image encoding plus prefill. ``decode_tokens_per_s``: tokens after the
    first divided by the time after the first (prefill excluded; 0 with one token).
    ``total_s``: add_request -> finished.
    """

    queue_s: float
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]  # generated ids; a stop token id is not included
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    index: int = 0  # which of the request's n choices


@dataclass
class StreamEvent:
    """New text of one choice of a request since its last event (complete UTF-8; may be "").

    Every choice (``index`` 0..n-1) gets exactly one finished event. When it failed,
    ``error`` says why (``result.finish_reason`` is "error" and holds what was
    generated before).
    """

    request_id: str
    text: str
    finished: bool = False
    result: GenerationResult | None = None  # set when finished
    error: Exception | None = None  # set when finished by a failure
    logprobs: list[TokenLogprob] | None = None  # of the tokens since the last event, when asked for
    index: int = 0  # which of the request's n choices
