"""Fault injection in the engine: whatever fails in a step, every request ends exactly once.

A fault is raised once, at one point of a step (image encoding, prefill, decode,
sampling, detokenising, the stop-string check), as one of the engine's own typed
errors or a plain bug, with 1 to ``max_batch`` requests in flight. Each request must
get exactly one finished event, nothing after it, and the engine must end empty. A
failure local to one row (its sampling, its text, non-finite scores) fails that row
alone: its neighbours answer exactly what they answer alone.
"""

from __future__ import annotations

import pytest
import torch

import builders
from fastvlm import FastVLM
from fastvlm.errors import ContextLengthError, InputError
from fastvlm.generation import detokenize, sampling
from fastvlm.generation.engine import Engine, GenerationError, GenerationRequest
from fastvlm.generation.sampling import NonFiniteLogitsError, SamplingParams
from fastvlm.processing import FastVLMProcessor

IMAGES = sorted(
    str(p) for p in (builders.shared_assets() / "images").iterdir() if p.suffix in (".jpg", ".png")
)
MAX_BATCH = 3
ERRORS = [GenerationError("injected"), InputError("injected"), RuntimeError("injected")]
POINTS = ["encode", "prefill", "decode", "sample", "detokenise", "stop"]


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint_dir):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype="float32", device="cpu", progress=False)
    return model, FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)


def make_engine(model_and_processor, **kwargs) -> Engine:
    return Engine(*model_and_processor, max_batch=MAX_BATCH, max_seq_len=256, feature_cache_size=0, **kwargs)


def request(i: int, max_new_tokens: int = 8, **kwargs) -> GenerationRequest:
    content = [{"type": "image", "image": IMAGES[i % len(IMAGES)]}, {"type": "text", "text": f"Say {i}."}]
    # Sampled, not greedy, so that every row goes through sample_next.
    params = SamplingParams(temperature=0.7, seed=i)
    return GenerationRequest([{"role": "user", "content": content}], max_new_tokens, params, **kwargs)


def fail_once(original, error: Exception, at: int):
    """``original`` that raises ``error`` on its ``at``-th call (1-based), once."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise error
        return original(*args, **kwargs)

    return wrapped


def inject(monkeypatch, engine: Engine, point: str, error: Exception, at: int = 1) -> None:
    targets = {
        "encode": (engine.runner, "encode_images"),
        "prefill": (engine.runner, "prefill"),
        "decode": (engine.runner, "decode"),
        "sample": (sampling, "sample_next"),
        "detokenise": (detokenize.TextStream, "push"),
        "stop": (detokenize, "find_stop"),
    }
    owner, name = targets[point]
    monkeypatch.setattr(owner, name, fail_once(getattr(owner, name), error, at))


def run_to_end(engine: Engine, ids: list[str], max_steps: int = 200) -> dict[str, list]:
    """Step until idle; return every request's events, checking they end exactly once."""
    events = run_choices_to_end(engine, {i: 1 for i in ids}, max_steps)
    return {request_id: seen for (request_id, _), seen in events.items()}


def run_choices_to_end(engine: Engine, choices: dict[str, int], max_steps: int = 200) -> dict[tuple, list]:
    """``choices``: request id -> n. Events by (request id, index); each choice ends once."""
    events: dict[tuple, list] = {(i, k): [] for i, n in choices.items() for k in range(n)}
    for _ in range(max_steps):
        if not engine.has_work:
            break
        for event in engine.step():
            seen = events[event.request_id, event.index]
            assert not (seen and seen[-1].finished), "event after end"
            seen.append(event)
    for key, seen in events.items():
        assert [e.finished for e in seen].count(True) == 1, f"{key} did not end exactly once"
        assert seen[-1].finished and seen[-1].result is not None and seen[-1].result.index == key[1]
    assert not engine.has_work and engine.num_running == 0 and not engine.scheduler.live()
    return events


@pytest.mark.parametrize("in_flight", [1, MAX_BATCH])
@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("point", POINTS)
def test_every_request_ends_exactly_once(model_and_processor, monkeypatch, point, error, in_flight):
    engine = make_engine(model_and_processor, prefill_per_step=MAX_BATCH)
    # Fire after the first step, when all requests are in flight (prefill: the second one's).
    at = {"encode": 1, "prefill": min(2, in_flight)}.get(point, in_flight + 1)
    inject(monkeypatch, engine, point, error, at)
    ids = [engine.add_request(request(i)) for i in range(in_flight)]
    events = run_to_end(engine, ids)
    failed = [seen[-1] for seen in events.values() if seen[-1].error is not None]
    assert failed, "the injected fault failed no request"
    for event in failed:
        assert event.result.finish_reason == "error"
        assert event.error is error or (
            isinstance(event.error, GenerationError) and "injected" in str(event.error)
        )
    assert engine.stats["requests_failed"] == len(failed)
    # The engine is still usable afterwards.
    (after,) = engine.generate([request(9, max_new_tokens=3)])
    assert after.finish_reason == "length"


@pytest.mark.parametrize("error", ERRORS[:1] + ERRORS[2:], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("point", POINTS)
def test_every_choice_ends_exactly_once(model_and_processor, monkeypatch, point, error):
    """Requests with n choices (2 + 1 rows of 3): a fault anywhere ends each choice once;
    a fault in the shared image encoding or prefill fails all n choices."""
    engine = make_engine(model_and_processor, prefill_per_step=MAX_BATCH)
    at = {"encode": 1, "prefill": 1}.get(point, 4)
    inject(monkeypatch, engine, point, error, at)
    wide = engine.add_request(request(0, n=2))
    single = engine.add_request(request(1))
    events = run_choices_to_end(engine, {wide: 2, single: 1})
    failed = {key for key, seen in events.items() if seen[-1].error is not None}
    assert failed
    if point == "prefill":  # the first request's: shared by its two choices
        assert failed == {(wide, 0), (wide, 1)}
    if point == "encode":  # one encoder call served both requests
        assert failed == {(wide, 0), (wide, 1), (single, 0)}
    assert engine.stats["requests_failed"] == len(failed)
    assert engine.generate([request(9, max_new_tokens=3, n=3)])[2].finish_reason == "length"


@pytest.mark.parametrize("point", ["sample", "detokenise", "stop"])
def test_a_row_local_failure_fails_that_row_alone(model_and_processor, monkeypatch, point):
    alone = {i: make_engine(model_and_processor).generate([request(i)])[0].token_ids for i in range(3)}
    engine = make_engine(model_and_processor, prefill_per_step=MAX_BATCH)
    victim_stop = "\x00victim"  # marks the victim's find_stop calls; never matches
    requests = [request(i, stop=[victim_stop] if i == 1 else []) for i in range(3)]
    ids = [engine.add_request(r) for r in requests]
    engine.step()  # all three prefilled (and one decode step)
    target = engine.scheduler.get(ids[1])
    owner, name = {
        "sample": (sampling, "sample_next"),  # (logits, params, generator, seen)
        "detokenise": (detokenize.TextStream, "push"),  # (self, token_id)
        "stop": (detokenize, "find_stop"),  # (text, stops)
    }[point]
    original = getattr(owner, name)

    def mine(args) -> bool:
        if point == "sample":
            return args[2] is target.generator
        if point == "detokenise":
            return args[0] is target.text
        return victim_stop in args[1]

    def only_the_victim(*args, **kwargs):
        if mine(args):
            raise InputError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, only_the_victim)
    events = run_to_end(engine, ids)
    ends = [events[i][-1] for i in ids]
    assert ends[1].error is not None and ends[1].result.finish_reason == "error"
    assert [ends[0].result.token_ids, ends[2].result.token_ids] == [alone[0], alone[2]]
    assert ends[0].error is None and ends[2].error is None


def test_non_finite_scores_fail_only_their_row(model_and_processor, monkeypatch):
    greedy = [GenerationRequest([{"role": "user", "content": f"Count {i}."}], 12) for i in range(3)]
    alone = [make_engine(model_and_processor).generate([r])[0].token_ids for r in greedy]
    engine = make_engine(model_and_processor, prefill_per_step=MAX_BATCH)
    ids = [engine.add_request(GenerationRequest(r.messages, 12)) for r in greedy]
    decode, steps = engine.runner.decode, [0]

    def poisoned(tokens, lengths):
        logits = decode(tokens, lengths).clone()  # (B, V); inference tensors are read-only
        steps[0] += 1
        if steps[0] == 3:
            logits[engine.scheduler.get(ids[0]).row, 5] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "decode", poisoned)
    events = run_to_end(engine, ids)
    first = events[ids[0]][-1]
    assert isinstance(first.error, NonFiniteLogitsError) and len(first.result.token_ids) == 3
    assert [events[i][-1].result.token_ids for i in ids[1:]] == alone[1:]


def test_finished_in_prefill_while_the_decode_fails(model_and_processor, monkeypatch):
    """A request that ends in its prefill still ends when the same step's decode fails."""
    engine = Engine(*model_and_processor, max_batch=2, max_seq_len=512)
    long_id = engine.add_request(GenerationRequest([{"role": "user", "content": "A."}], 400))
    engine.step()
    short_id = engine.add_request(GenerationRequest([{"role": "user", "content": "B."}], 1))
    inject(monkeypatch, engine, "decode", GenerationError("injected"))
    events = {e.request_id: e for e in engine.step()}
    assert events[short_id].finished and events[short_id].error is None
    assert events[short_id].result.finish_reason == "length"
    assert events[long_id].finished and isinstance(events[long_id].error, GenerationError)
    assert not engine.has_work and engine.num_running == 0


def test_sampling_settings_are_bounded():
    for bad in [
        dict(repetition_penalty=1e-38),
        dict(repetition_penalty=1e-320),
        dict(repetition_penalty=101.0),
        dict(temperature=1e9),
        dict(temperature=float("nan")),
        dict(top_p=float("inf")),
        dict(seed=2**70),
        dict(top_k=1.5),
        dict(temperature=True),
    ]:
        with pytest.raises(InputError):
            SamplingParams(**bad)
    SamplingParams(temperature=100.0, repetition_penalty=0.01, seed=-1)
    SamplingParams(repetition_penalty=100.0, seed=2**64 - 1)


def test_images_and_characters_are_bounded_before_any_work(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    engine = Engine(model, processor, max_seq_len=64, max_images_per_request=2)
    calls = []
    monkeypatch.setattr(processor, "apply_chat_template", lambda *a, **k: calls.append(a))
    three = [{"type": "image", "image": IMAGES[0]}] * 3 + [{"type": "text", "text": "Hi."}]
    with pytest.raises(InputError, match="3 images; this engine takes at most 2"):
        engine.prepare(GenerationRequest([{"role": "user", "content": three}]))
    huge = "x" * (64 * engine.limits.max_token_chars + 1)
    with pytest.raises(ContextLengthError, match="characters"):
        engine.prepare(GenerationRequest([{"role": "user", "content": huge}]))
    assert not calls  # neither was tokenized nor decoded


def test_queued_pixels_are_uint8_and_the_model_sees_the_processor_output(model_and_processor):
    model, processor = model_and_processor
    messages = request(0).messages
    prepared = make_engine(model_and_processor).prepare(GenerationRequest(messages, 8))
    assert prepared.pixels.dtype == torch.uint8
    expected = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["pixel_values"]
    assert torch.equal(processor.normalize_pixels(prepared.pixels), expected)


def test_cached_features_are_compact(model_and_processor):
    engine = Engine(*model_and_processor, max_seq_len=256)
    two = [{"type": "image", "image": p} for p in IMAGES[:2]] + [{"type": "text", "text": "Both?"}]
    engine.generate([GenerationRequest([{"role": "user", "content": two}], 2)])
    cache = engine.feature_cache
    assert len(cache) == 2
    entries = [cache.get(k) for k in list(cache._entries)]
    assert all(e.untyped_storage().nbytes() == e.numel() * e.element_size() for e in entries)
    assert cache.nbytes == sum(e.numel() * e.element_size() for e in entries)
