"""One request's life inside the engine: prompt, cache row, generated ids, finish state.

A ``Sequence`` decides when it is done (stop id, stop string, token budget) and turns
its ids into safe text, but never touches the model: the runner moves tensors, the
engine moves sequences between the waiting queue and cache rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .constraints import Matcher
from .detokenize import TextStream
from .prepare import PreparedRequest
from .request import FinishReason, GenerationRequest, GenerationResult, Timings, TokenLogprob, Usage
from .scores import new_counts


@dataclass
class Sequence:
    request: GenerationRequest
    prompt_ids: torch.Tensor  # (T,) int64 on CPU, image placeholders expanded
    pixels: torch.Tensor | None  # (n_images, 3, S, S) uint8 on CPU, in prompt order; see prepare
    image_keys: list[str]  # feature-cache key of each image
    stop_ids: frozenset[int]
    text: TextStream
    max_new_tokens: int  # the request's budget, fitted to the context when it asked for that
    generator: torch.Generator | None = None
    # Prompt + generated ids on the model device, only when a repetition penalty needs them.
    history: torch.Tensor | None = None
    matcher: Matcher | None = None  # where a constrained answer stands in its grammar
    # (V,) float32 counts of the generated ids, only when a presence/frequency penalty needs them.
    counts: torch.Tensor | None = None
    logprobs: list[TokenLogprob] | None = None  # one per output id, when the request asked
    logprobs_sent: int = 0  # entries already handed out in stream events
    added_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    row: int = -1  # cache row while running
    length: int = 0  # columns of the row filled with this sequence's keys
    output_ids: list[int] = field(default_factory=list)
    num_generated: int = 0  # includes a final stop id, which output_ids leave out
    finish_reason: FinishReason | None = None
    error: Exception | None = None  # why it failed, with finish_reason "error"
    cancel_requested: bool = False
    index: int = 0  # which of the request's n choices

    @classmethod
    def from_prepared(
        cls,
        prepared: PreparedRequest,
        decode,
        default_stop_ids: list[int],
        device: torch.device,
        *,
        vocab_size: int = 0,
        index: int = 0,
    ) -> Sequence:
        """Choice ``index`` of a request, ready to queue; ``decode`` is the tokenizer's (for
        streaming text), ``vocab_size`` the model's (sizes the token counts a penalty needs)."""
        request, p, T = prepared.request, prepared.request.sampling, prepared.prompt_ids.numel()
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=device).manual_seed(choice_seed(p.seed, index))
        history = None
        if p.repetition_penalty != 1.0:
            history = torch.empty(
                T + prepared.max_new_tokens, dtype=torch.long, device=device
            )  # (T + budget,)
            history[:T] = prepared.prompt_ids.to(device)
        stops = request.stop_token_ids if request.stop_token_ids is not None else default_stop_ids
        matcher = prepared.grammar.matcher() if prepared.grammar is not None else None
        if matcher is not None:  # the grammar's end ids end the answer, whatever stop ids it asked for
            stops = [*stops, *matcher.space.eos_ids]
        return cls(
            request=request,
            prompt_ids=prepared.prompt_ids,
            pixels=prepared.pixels if index == 0 else None,  # the first choice's prefill serves all
            image_keys=prepared.image_keys,
            stop_ids=frozenset(stops),
            text=TextStream(decode, request.stop),
            max_new_tokens=prepared.max_new_tokens,
            generator=generator,
            history=history,
            matcher=matcher,
            counts=new_counts(vocab_size, device) if p.counts_tokens else None,
            logprobs=[] if request.logprobs else None,
            added_at=prepared.added_at,
            index=index,
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def key(self) -> tuple[str, int]:
        """Which choice of which request: unique among live sequences."""
        return self.request_id, self.index

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def seen(self) -> torch.Tensor | None:
        """Ids the repetition penalty looks at (prompt and generated), or None."""
        if self.history is None:
            return None
        return self.history[: self.num_prompt_tokens + self.num_generated]

    def accept(self, token: int, now: float, logprob: TokenLogprob | None = None) -> str:
        """Record a generated token (and its logprob); return the text it makes safe to show."""
        if self.first_token_at is None:
            self.first_token_at = now
        if self.history is not None:
            self.history[self.num_prompt_tokens + self.num_generated] = token
        self._count(token)
        self.num_generated += 1
        if token in self.stop_ids:
            return self.finish("stop", now)
        self.output_ids.append(token)
        self._record_logprob(logprob)
        piece = self.text.push(token)
        if self.text.stopped or self._grammar_done(token):
            return piece + self.finish("stop", now)
        if self.num_generated >= self.max_new_tokens:
            return piece + self.finish("length", now)
        return piece

    def _grammar_done(self, token: int) -> bool:
        """Advance the grammar, if any; True once it allows nothing but an end id.

        Ending here, not on the end id the grammar would force next, saves a decode step.
        """
        if self.matcher is None:
            return False
        self.matcher.accept(token)
        return self.matcher.terminated

    def _count(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1

    def _record_logprob(self, logprob: TokenLogprob | None) -> None:
        """Kept beside output_ids, so a final stop token has no entry either."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)

    def new_logprobs(self) -> list[TokenLogprob] | None:
        """Entries since the last call (for a stream event), or None when not asked for."""
        if self.logprobs is None:
            return None
        new = self.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.logprobs)
        return new

    def finish(self, reason: FinishReason, now: float) -> str:
        """Mark done; return text that was held back and may now be shown."""
        self.finish_reason = reason
        self.finished_at = now
        return self.text.finish()

    def fail(self, error: Exception, now: float) -> None:
        """Mark done by a failure; text held back (a possible stop string) stays unsaid."""
        self.error = error
        self.finish_reason = "error"
        self.finished_at = now
        self.pixels = None

    def result(self) -> GenerationResult:
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        admitted = self.admitted_at if self.admitted_at is not None else end
        first = self.first_token_at if self.first_token_at is not None else end
        after_first = self.num_generated - 1
        decode_s = end - first
        return GenerationResult(
            request_id=self.request_id,
            index=self.index,
            text=self.text.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason or "cancelled",
            logprobs=None if self.logprobs is None else list(self.logprobs),
            usage=Usage(
                prompt_tokens=self.num_prompt_tokens,
                completion_tokens=self.num_generated,
                total_tokens=self.num_prompt_tokens + self.num_generated,
            ),
            timings=Timings(
                queue_s=admitted - self.added_at,
                ttft_s=first - admitted if self.first_token_at is not None else 0.0,
                decode_tokens_per_s=after_first / decode_s if after_first > 0 and decode_s > 0 else 0.0,
                total_s=end - self.added_at,
            ),
        )


_SEED_STRIDE = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads consecutive indices apart


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index``: choice 0 keeps the request's own (it answers as n=1
    does), the others get distinct seeds derived from (seed, index)."""
    return seed if index == 0 else (seed + index * _SEED_STRIDE) % 2**64
