"""The continuous-batching engine: requests in, stream events and results out.

Each ``step`` reads as schedule -> run -> postprocess: admit waiting requests into free
cache rows and prefill them (encoding images through the feature cache), then one
batched decode step for every running request, then hand out the new text. New
requests join between decode steps; finished ones free their row at once.

A request's life: ``prepare`` (pure CPU, any thread) -> ``add_prepared`` (queued) ->
admitted and prefilled -> decoded -> exactly one finished event: stopped, cut at its
length, cancelled, or failed. A request with ``n`` choices is prefilled once (one
image encoding), its cache row copied to n rows, and each row decoded as its own
sequence with its own finished event (events carry the choice's ``index``).
A failure ends only the requests it touches: a model call that raises fails the rows
it computed for; a row whose scores turn non-finite, or whose sampling, detokenising
or stop check raises, fails alone.

The engine is synchronous and single-threaded, and it knows nothing about HTTP: a
server runs it in one worker thread and talks to it through queues. It does know
about text (through the processor) so that stop strings and streaming are exact.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import CheckpointError, FastVLMError, InputError
from ..processing.token_bytes import TokenBytes
from .constraints import GrammarCompiler, allowed_masks
from .drivers import Drivers
from .feature_cache import DEFAULT_MAX_BYTES, FeatureCache, gather_features
from .logprobs import token_logprob
from .prepare import DEFAULT_MAX_IMAGES, PreparedRequest, PrepareLimits, prepare_request
from .request import GenerationRequest, GenerationResult, StreamEvent, Timings, Usage
from .runner import ModelRunner
from .sampling import SamplingParams, sample_rows
from .scheduler import Scheduler, by_request
from .scores import check_logit_bias_ids
from .sequence import Sequence
from .step import StepOutput
from .stopping import default_stop_token_ids

__all__ = [
    "Engine",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "PreparedRequest",
    "SamplingParams",
    "StreamEvent",
    "Timings",
    "Usage",
]

log = logging.getLogger("fastvlm.engine")

DEFAULT_MAX_SEQ_LEN = 4096  # cache columns per row unless asked otherwise
_ENCODER_BATCH = 8  # images per vision-encoder call: bounds activation memory at 1024 px


class GenerationError(RuntimeError):
    """Model compute failed for a request (it may work on a retry): the error of its failed event."""


class Engine(Drivers):
    """Continuous batching over one preallocated KV cache of ``max_batch`` rows.

    ``max_seq_len`` (prompt + new tokens per request) defaults to 4096 and is capped at
    the model's context; image features are kept for reuse, at most
    ``feature_cache_size`` entries and ``feature_cache_bytes`` (either 0 turns the cache
    off); a request may carry at most ``max_images_per_request`` images; at most
    ``prefill_per_step`` new requests are prefilled per step, so a burst of arrivals
    cannot stall running streams or each other's first token.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        feature_cache_size: int = 32,
        feature_cache_bytes: int = DEFAULT_MAX_BYTES,
        prefill_per_step: int = 1,
        max_images_per_request: int = DEFAULT_MAX_IMAGES,
    ) -> None:
        if min(max_batch, prefill_per_step) < 1 or min(feature_cache_size, feature_cache_bytes) < 0:
            raise InputError("max_batch and prefill_per_step must be >= 1, the feature cache limits >= 0")
        if max_images_per_request < 0:
            raise InputError(f"max_images_per_request must be >= 0, got {max_images_per_request}")
        context = model.config.text.max_position_embeddings
        if getattr(processor, "max_length", None):
            context = min(context, processor.max_length)
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, context)
        if self.max_seq_len < 2:
            raise InputError(f"max_seq_len must be >= 2, got {max_seq_len}")
        if processor.image_token_id != model.config.image_token_id:
            raise CheckpointError(
                f"the processor marks images with id {processor.image_token_id} but the model expects "
                f"{model.config.image_token_id}; load both from the same checkpoint"
            )
        self.model, self.processor = model, processor
        self.max_batch = max_batch
        self.prefill_per_step = prefill_per_step
        self.runner = ModelRunner(model, max_batch, self.max_seq_len)
        self.feature_cache = FeatureCache(feature_cache_size, feature_cache_bytes)
        self._token_bytes: TokenBytes | None = None
        tokenizer = processor.tokenizer
        self.limits = PrepareLimits(
            max_seq_len=self.max_seq_len,
            max_images=max_images_per_request,
            max_token_chars=_longest_token(tokenizer),
            hash_images=self.feature_cache.enabled,
        )
        self.default_stop_token_ids = default_stop_token_ids(
            model.config.eos_token_id, tokenizer.convert_tokens_to_ids
        )
        self.scheduler = Scheduler(max_batch, prefill_per_step, self.runner.move_row)
        self.grammars = GrammarCompiler(tokenizer, model.config.text.vocab_size, self.default_stop_token_ids)
        self.stats = {
            "encoder_calls": 0,  # vision-encoder forward passes (each up to _ENCODER_BATCH images)
            "images_encoded": 0,
            "feature_cache_hits": 0,
            "prefills": 0,  # prompts prefilled: once per request, whatever its n
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "requests_finished": 0,  # choices: a request with n choices counts n
            "requests_failed": 0,
        }

    # -- queue ------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize the prompt and load its images; touches no engine state (any thread).

        Raises InputError (bad messages or images, or a constraint that cannot be
        enforced) or ContextLengthError before any model compute, so a caller can reject
        the request at once.
        """
        self._check_sampling(request)
        grammar = self.grammars.compile(request.constraint) if request.constraint is not None else None
        prepared = prepare_request(request, self.processor, self.limits)
        prepared.grammar = grammar
        return prepared

    def _check_sampling(self, request: GenerationRequest) -> None:
        """Settings valid on their own that this engine's model cannot honour."""
        check_logit_bias_ids(request.sampling.logit_bias, self.runner.vocab_size)
        if request.n > self.max_batch:
            raise InputError(f"n={request.n} choices need {request.n} rows; this engine has {self.max_batch}")

    def add_prepared(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (engine thread only). Returns the request id."""
        request = prepared.request
        if self.scheduler.get(request.request_id) is not None:
            raise InputError(f"request id {request.request_id!r} is already in use; pick another")
        self._check_sampling(request)  # cheap, and a prepared request may come from elsewhere
        choices = [
            Sequence.from_prepared(
                prepared,
                self.processor.tokenizer.decode,
                self.default_stop_token_ids,
                self.runner.device,
                vocab_size=self.runner.vocab_size,
                index=i,
            )
            for i in range(request.n)
        ]
        self.scheduler.add(choices)
        return request.request_id

    def add_request(self, request: GenerationRequest) -> str:
        """``prepare`` then ``add_prepared``, on the calling thread."""
        if self.scheduler.get(request.request_id) is not None:  # before paying for preparation
            raise InputError(f"request id {request.request_id!r} is already in use; pick another")
        return self.add_prepared(self.prepare(request))

    def cancel(self, request_id: str) -> None:
        """Finish a request (all its choices) at the next step with reason "cancelled";
        unknown ids are ignored."""
        for seq in self.scheduler.choices(request_id):
            seq.cancel_requested = True

    # -- one iteration ------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        """Admit and prefill waiting requests, then one decode step for every running one.

        Never raises for a request's failure: that request's finished event carries it.
        """
        out, released = StepOutput(), []
        try:
            now = time.perf_counter()
            for seq in self.scheduler.to_cancel():
                out.emit(seq, seq.finish("cancelled", now))
            released += self.scheduler.release_finished()  # their rows are free for admission
            admitted = self.scheduler.admit()
            if admitted:
                self._prefill(admitted, out)
            if self.scheduler.running:
                self._decode(out)
        except Exception as exc:  # a bug of ours: still, no request may be left without an end
            log.exception("engine step failed unexpectedly; failing every request it holds")
            for seq in self.scheduler.live():
                self._fail(seq, exc, out)
        released += self.scheduler.release_finished()
        self.stats["requests_finished"] += len(released)
        self.stats["requests_failed"] += sum(s.error is not None for s in released)
        return out.events(released)

    def _prefill(self, admitted: list[Sequence], out: StepOutput) -> None:
        now = time.perf_counter()
        for seq in admitted:
            seq.admitted_at = now
        # Only a request's first choice carries pixels: n choices encode their images once.
        features = self._image_features([s for s in admitted if s.pixels is not None], out)
        for group in by_request(admitted):
            self._prefill_choices(group, features.get(group[0].request_id), out)

    def _prefill_choices(self, choices: list[Sequence], features, out: StepOutput) -> None:
        """Prefill one request into the next free row, sample each choice's first token
        from its logits, then give every choice that goes on a row of its own."""
        first = choices[0]
        if first.finished:  # its images failed to encode: so did every choice's
            for seq in choices[1:]:
                self._fail(seq, first.error or GenerationError("image encoding failed"), out)
            return
        row = first.row = self.scheduler.next_row()
        try:
            logits = self.runner.prefill(row, first.prompt_ids, features)  # (V,)
        except Exception as exc:
            error = _compute_error("prefill failed", exc)
            for seq in choices:
                self._fail(seq, error, out)
            return
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += first.num_prompt_tokens
        for seq in choices:
            seq.length = seq.num_prompt_tokens
            seq.pixels = None  # the features are in the cache row now
        self._sample_and_accept(choices, logits.expand(len(choices), -1), out)  # (n, V)
        # Rows are packed: the first choice still going takes the prefilled row, the
        # others copy it. A choice that ended on its first token never needs a row.
        for seq in (s for s in choices if not s.finished):
            seq.row = self.scheduler.next_row()
            if seq.row != row:
                self.runner.copy_row(row, seq.row, seq.length)
            self.scheduler.start(seq)

    def _decode(self, out: StepOutput) -> None:
        seqs = list(self.scheduler.running)
        try:
            logits = self.runner.decode([s.last_token for s in seqs], [s.length for s in seqs])  # (B, V)
        except Exception as exc:
            error = _compute_error("decode step failed", exc)
            for seq in seqs:
                self._fail(seq, error, out)
            return
        self.stats["decode_steps"] += 1
        for seq in seqs:
            seq.length += 1  # the token fed this step is now in the cache
        self._sample_and_accept(seqs, logits, out)

    def _sample_and_accept(self, seqs: list[Sequence], logits: torch.Tensor, out: StepOutput) -> None:
        """One token per row of (B, V) ``logits``; a row that fails here fails alone."""
        params = [s.request.sampling for s in seqs]
        generators, seen = [s.generator for s in seqs], [s.seen() for s in seqs]
        wanted = [s.request.top_logprobs if s.request.logprobs else None for s in seqs]
        tokens, failed, logprobs = sample_rows(
            logits,
            params,
            generators,
            seen,
            counts=[s.counts for s in seqs],
            top_logprobs=wanted,
            allowed=_grammar_masks(seqs),
        )
        now = time.perf_counter()
        for b, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if b in failed:
                self._fail(seq, failed[b], out)
                continue
            self.stats["generated_tokens"] += 1
            try:
                entry = token_logprob(logprobs[b], self._spell) if b in logprobs else None
                out.emit(seq, seq.accept(token, now, entry))  # detokenising and the stop checks
            except Exception as exc:
                self._fail(seq, exc, out)

    def _image_features(self, seqs: list[Sequence], out: StepOutput) -> dict[str, torch.Tensor]:
        """(n_images, N, H) features by request id, through the feature cache.

        Pixels wait as uint8; only the images the encoder runs on are normalised.
        """
        if not seqs:
            return {}
        images = [list(zip(s.image_keys, s.pixels, strict=True)) for s in seqs]

        def encode(pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) uint8 -> (n, N, H)
            # Normalised on the model's device: a quarter of the bytes cross to it.
            return self.runner.encode_images(self.processor.normalize_pixels(pixels.to(self.runner.device)))

        try:
            features, counts = gather_features(images, self.feature_cache, encode, _ENCODER_BATCH)
        except Exception as exc:
            error = _compute_error("image encoding failed", exc)
            for seq in seqs:
                self._fail(seq, error, out)
            return {}
        for name, value in counts.items():
            self.stats[name] += value
        return {s.request_id: f for s, f in zip(seqs, features, strict=True)}

    @property
    def _spell(self) -> TokenBytes:
        """Token id -> (text, bytes), built on first use: only logprobs need it."""
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.processor.tokenizer)
        return self._token_bytes

    def _fail(self, seq: Sequence, error: Exception, out: StepOutput) -> None:
        if not seq.finished:
            seq.fail(error, time.perf_counter())
            out.emit(seq, "")


def _grammar_masks(seqs: list[Sequence]) -> list[torch.Tensor | None] | None:
    """The allowed-token mask of each constrained row; None (and no work) when none is."""
    if all(s.matcher is None for s in seqs):
        return None
    return allowed_masks([s.matcher for s in seqs])


def _compute_error(stage: str, exc: Exception) -> Exception:
    """A model call's failure as a request's error: our typed errors as they are."""
    if isinstance(exc, (FastVLMError, GenerationError)):
        return exc
    error = GenerationError(f"{stage}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _longest_token(tokenizer) -> int:
    """Characters in the longest token (its byte-level form has at least as many)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max(map(len, vocab), default=1024)  # unknown: a generous bound
