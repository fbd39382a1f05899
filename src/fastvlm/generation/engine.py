"""The continuous-batching engine: requests in, stream events and results out.

Each ``step`` reads as schedule -> run -> postprocess: admit waiting requests into free
cache rows and prefill them (encoding images through the feature cache), then one
batched decode step for every running request, then hand out the new text. New
requests join between decode steps; finished ones free their row at once.

The engine is synchronous and single-threaded, and it knows nothing about HTTP: a
server runs it in one worker thread and talks to it through queues. It does know
about text (through the processor) so that stop strings and streaming are exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from ..errors import CheckpointError, InputError
from .feature_cache import FeatureCache, gather_features
from .prepare import prepare_sequence
from .request import GenerationRequest, GenerationResult, StreamEvent, Timings, Usage
from .runner import ModelRunner
from .sampling import SamplingParams, sample_rows
from .scheduler import Scheduler
from .sequence import Sequence
from .stopping import default_stop_token_ids

__all__ = [
    "Engine",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "StreamEvent",
    "Timings",
    "Usage",
]

DEFAULT_MAX_SEQ_LEN = 4096  # cache columns per row unless asked otherwise
_ENCODER_BATCH = 8  # images per vision-encoder call: bounds activation memory at 1024 px


class GenerationError(RuntimeError):
    """Model compute failed inside ``step``. ``request_ids`` were dropped; the rest go on.

    ``events`` holds the events the step had produced (other requests' text) before it failed.
    """

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids
        self.events: list[StreamEvent] = []  # what the failing step produced before it failed


class Engine:
    """Continuous batching over one preallocated KV cache of ``max_batch`` rows.

    ``max_seq_len`` (prompt + new tokens per request) defaults to 4096 and is capped at
    the model's context; ``feature_cache_size`` image features are kept for reuse (0
    turns the cache off); at most ``prefill_per_step`` new requests are prefilled per
    step, so a burst of arrivals cannot stall running streams or each other's first token.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        feature_cache_size: int = 32,
        prefill_per_step: int = 1,
    ) -> None:
        if max_batch < 1 or prefill_per_step < 1 or feature_cache_size < 0:
            raise InputError("max_batch and prefill_per_step must be >= 1, feature_cache_size >= 0")
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
        self.feature_cache = FeatureCache(feature_cache_size)
        tokenizer = processor.tokenizer
        self.default_stop_token_ids = default_stop_token_ids(
            model.config.eos_token_id, tokenizer.convert_tokens_to_ids
        )
        self.scheduler = Scheduler(max_batch, prefill_per_step, self.runner.move_row)
        self.stats = {
            "encoder_calls": 0,  # vision-encoder forward passes (each up to _ENCODER_BATCH images)
            "images_encoded": 0,
            "feature_cache_hits": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "requests_finished": 0,
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

    def add_request(self, request: GenerationRequest) -> str:
        """Tokenize the prompt and load its images now; queue it. Returns the request id.

        Raises InputError (bad messages or images) or ContextLengthError before any
        model compute, so a caller can reject the request at once.
        """
        added_at = time.perf_counter()
        if self.scheduler.get(request.request_id) is not None:
            raise InputError(f"request id {request.request_id!r} is already in use; pick another")
        seq = prepare_sequence(
            request,
            self.processor,
            max_seq_len=self.max_seq_len,
            device=self.runner.device,
            default_stop_ids=self.default_stop_token_ids,
            hash_images=self.feature_cache.capacity > 0,
            added_at=added_at,
        )
        self.scheduler.add(seq)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Finish a request at the next step with reason "cancelled"; unknown ids are ignored."""
        seq = self.scheduler.get(request_id)
        if seq is not None:
            seq.cancel_requested = True

    # -- one iteration ------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        """Admit and prefill waiting requests, then one decode step for every running one."""
        pieces: dict[str, list[str]] = {}
        touched: list[Sequence] = []

        def emit(seq: Sequence, text: str) -> None:
            if seq.request_id not in pieces:
                pieces[seq.request_id] = []
                touched.append(seq)
            pieces[seq.request_id].append(text)

        try:
            now = time.perf_counter()
            for seq in self.scheduler.to_cancel():
                emit(seq, seq.finish("cancelled", now))
            self._release_finished()
            admitted = self.scheduler.admit()
            if admitted:
                self._prefill(admitted, emit)
            if self.scheduler.running:
                self._decode(emit)
            self._release_finished()
        except GenerationError as exc:
            # Text already accepted this step must still reach its streams.
            exc.events = [self._event(seq, "".join(pieces[seq.request_id])) for seq in touched]
            raise
        return [self._event(seq, "".join(pieces[seq.request_id])) for seq in touched]

    def _prefill(self, admitted: list[Sequence], emit) -> None:
        now = time.perf_counter()
        for seq in admitted:
            seq.admitted_at = now
        try:
            features = self._image_features(admitted)
        except Exception as exc:
            self._drop(admitted)
            raise GenerationError(f"image encoding failed: {exc}", [s.request_id for s in admitted]) from exc
        for i, seq in enumerate(admitted):
            seq.row = self.scheduler.next_row()
            try:
                logits = self.runner.prefill(seq.row, seq.prompt_ids, features[i])  # (V,)
                (token,) = sample_rows(logits[None], [seq.request.sampling], [seq.generator], [seq.seen()])
            except Exception as exc:
                self._drop(admitted[i:])
                raise GenerationError(f"prefill failed: {exc}", [s.request_id for s in admitted[i:]]) from exc
            seq.length = seq.num_prompt_tokens
            self.stats["prompt_tokens"] += seq.num_prompt_tokens
            self.stats["generated_tokens"] += 1
            emit(seq, seq.accept(token, time.perf_counter()))
            if not seq.finished:
                self.scheduler.start(seq)

    def _decode(self, emit) -> None:
        seqs = self.scheduler.running
        try:
            logits = self.runner.decode([s.last_token for s in seqs], [s.length for s in seqs])  # (B, V)
            params = [s.request.sampling for s in seqs]
            tokens = sample_rows(logits, params, [s.generator for s in seqs], [s.seen() for s in seqs])
        except Exception as exc:
            ids = [s.request_id for s in seqs]
            self._drop(list(seqs))
            raise GenerationError(f"decode step failed: {exc}", ids) from exc
        now = time.perf_counter()
        self.stats["decode_steps"] += 1
        self.stats["generated_tokens"] += len(seqs)
        for seq, token in zip(seqs, tokens, strict=True):
            seq.length += 1  # the token fed this step is now in the cache
            emit(seq, seq.accept(token, now))

    def _image_features(self, seqs: list[Sequence]) -> list[torch.Tensor | None]:
        """(n_images, N, H) features per sequence, through the feature cache."""
        images = [list(zip(s.image_keys, _rows(s.pixels), strict=True)) for s in seqs]
        features, counts = gather_features(
            images, self.feature_cache, self.runner.encode_images, _ENCODER_BATCH
        )
        for name, value in counts.items():
            self.stats[name] += value
        return features

    def _release_finished(self) -> None:
        self.stats["requests_finished"] += len(self.scheduler.release_finished())

    def _drop(self, seqs: list[Sequence]) -> None:
        """Remove sequences after a compute failure, keeping the running rows packed."""
        now = time.perf_counter()
        for seq in seqs:
            if not seq.finished:
                seq.finish("cancelled", now)
        self._release_finished()

    def _event(self, seq: Sequence, text: str) -> StreamEvent:
        result = seq.result() if seq.finished else None
        return StreamEvent(request_id=seq.request_id, text=text, finished=seq.finished, result=result)

    # -- convenience drivers: they own the step loop, so don't mix them with another one ---
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` together to completion; results in the order given."""
        ids: list[str] = []
        results: dict[str, GenerationResult] = {}
        try:
            for request in requests:
                ids.append(self.add_request(request))
            while len(results) < len(ids):
                for event in self.step():
                    if event.finished and event.request_id in ids:
                        results[event.request_id] = event.result
        finally:
            self._abandon(set(ids) - set(results))
        return [results[i] for i in ids]

    def stream_events(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        """Events of one request as it runs; the last one is finished and holds the result.

        The request is added (and checked) now, so bad input raises here, not on first use.
        """
        return self._follow(self.add_request(request))

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text pieces of one request (complete UTF-8); joined they equal the result text."""
        return _texts(self.stream_events(request))

    def _follow(self, request_id: str) -> Iterator[StreamEvent]:
        finished = False
        try:
            while not finished:
                for event in self.step():
                    if event.request_id == request_id:
                        finished = event.finished
                        yield event
        finally:
            if not finished:
                self._abandon({request_id})

    def _abandon(self, request_ids: set[str]) -> None:
        """A driver was closed early (or failed): cancel its requests and free their rows."""
        now = time.perf_counter()
        for seq in filter(None, map(self.scheduler.get, request_ids)):
            if not seq.finished:
                seq.finish("cancelled", now)
        self._release_finished()


def _rows(pixels: torch.Tensor | None) -> list[torch.Tensor]:
    return [] if pixels is None else list(pixels)


def _texts(events: Iterator[StreamEvent]) -> Iterator[str]:
    try:
        for event in events:
            if event.text:
                yield event.text
    finally:
        events.close()  # closing the text stream must cancel the request at once
