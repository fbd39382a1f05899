"""The batching engine on a tiny random-weight checkpoint with the real Qwen2 tokenizer.

The reference is the plain ``model.generate`` path (itself tested against
transformers) and each request run alone: a continuous batch must not change what
any request produces under greedy decoding or a fixed seed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import builders
from fastvlm import FastVLM
from fastvlm.errors import ContextLengthError, InputError
from fastvlm.generation.detokenize import TextStream
from fastvlm.generation.engine import Engine, GenerationError, GenerationRequest
from fastvlm.generation.feature_cache import FeatureCache
from fastvlm.generation.sampling import SamplingParams
from fastvlm.generation.stopping import find_stop, holdback_start
from fastvlm.processing import FastVLMProcessor

IMAGES = sorted(
    str(p) for p in (builders.shared_assets() / "images").iterdir() if p.suffix in (".jpg", ".png")
)


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint_dir):
    folder = tiny_checkpoint_dir
    model = FastVLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    return model, FastVLMProcessor.from_pretrained(folder)


@pytest.fixture
def engine(model_and_processor):
    return Engine(*model_and_processor, max_batch=8, max_seq_len=256)


def msg(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def request(text: str, *images: str, **kwargs) -> GenerationRequest:
    return GenerationRequest(msg(text, *images), **kwargs)


def record_moves(eng: Engine, log: list) -> None:
    move_row = eng.runner.cache.move_row

    def logged(src: int, dst: int) -> None:
        log.append((src, dst))
        move_row(src, dst)

    eng.runner.cache.move_row = logged


def fresh(r: GenerationRequest) -> GenerationRequest:
    """The same request under a new id (ids must be unique among live requests)."""
    return replace(r, request_id=GenerationRequest([]).request_id)


# ---- exactness -------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_matches_model_generate(engine, model_and_processor):
    model, processor = model_and_processor
    for r in [
        request("What is shown here?", IMAGES[0], max_new_tokens=12),
        request("Just text, no image at all.", max_new_tokens=10),
        request("Compare the two.", IMAGES[1], IMAGES[2], max_new_tokens=10),
    ]:
        inputs = processor.apply_chat_template(
            r.messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        out = model.generate(inputs["input_ids"], inputs.get("pixel_values"), max_new_tokens=r.max_new_tokens)
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        result = engine.generate([r])[0]
        assert result.token_ids == expected
        assert result.finish_reason == "length"
        assert result.usage.prompt_tokens == inputs["input_ids"].shape[1]
        assert result.text == processor.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_mixed_batch_equals_each_request_alone(model_and_processor):
    requests = [
        request("What is this?", IMAGES[0], max_new_tokens=8),
        request(
            "A long text-only prompt about the sea, mountains and rivers of the north.", max_new_tokens=6
        ),
        request("Compare these.", IMAGES[1], IMAGES[2], max_new_tokens=10),
        request(
            "Sample.",
            IMAGES[3],
            max_new_tokens=7,
            sampling=SamplingParams(temperature=0.9, top_p=0.9, seed=1),
        ),
        request("Penalty.", IMAGES[0], max_new_tokens=8, sampling=SamplingParams(repetition_penalty=1.5)),
        request(
            "k, min_p.",
            max_new_tokens=6,
            sampling=SamplingParams(temperature=1.2, top_k=50, min_p=0.05, seed=7),
        ),
    ]
    alone_engine = Engine(*model_and_processor, max_batch=1, max_seq_len=256, feature_cache_size=0)
    alone = [alone_engine.generate([fresh(r)])[0].token_ids for r in requests]
    # All at once, and with fewer rows than requests so that requests join mid-flight,
    # rows are reused and survivors are moved to keep the batch packed.
    moves: list[tuple[int, int]] = []
    for max_batch, per_step in [(8, 1), (3, 1), (2, 2)]:
        eng = Engine(*model_and_processor, max_batch=max_batch, max_seq_len=256, prefill_per_step=per_step)
        record_moves(eng, moves)
        together = eng.generate([fresh(r) for r in requests])
        assert [r.token_ids for r in together] == alone, (max_batch, per_step)
        assert not eng.has_work and eng.num_running == 0
    assert moves  # survivors were repacked into freed rows along the way


@pytest.mark.slow
def test_seed_reproducible_and_greedy_limits(engine):
    def run(**sampling):
        return engine.generate(
            [request("Tell me.", IMAGES[0], max_new_tokens=10, sampling=SamplingParams(**sampling))]
        )[0]

    greedy = run().token_ids
    assert run(temperature=1.0, seed=3).text == run(temperature=1.0, seed=3).text
    assert run(temperature=1.0, seed=3).token_ids != run(temperature=1.0, seed=4).token_ids
    assert run(temperature=1.0, top_k=1, seed=5).token_ids == greedy
    assert run(temperature=1e-6, seed=5).token_ids == greedy


# ---- stopping --------------------------------------------------------------------------


def test_stop_token_ids(engine):
    base = engine.generate([request("Go.", IMAGES[0], max_new_tokens=12)])[0]
    index = next(i for i, t in enumerate(base.token_ids) if i >= 2 and t not in base.token_ids[:i])
    stopped = engine.generate(
        [request("Go.", IMAGES[0], max_new_tokens=12, stop_token_ids=[base.token_ids[index]])]
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == base.token_ids[:index]  # the stop id itself is not part of the output
    assert stopped.usage.completion_tokens == index + 1
    assert base.finish_reason == "length" and len(base.token_ids) == 12


def test_stop_strings_cut_and_stream_holds_back(engine):
    base = engine.generate([request("Go on.", max_new_tokens=16)])[0].text
    start = len(base) // 2
    stop = base[start : start + 3]
    cut = base.find(stop)
    pieces = list(engine.stream(request("Go on.", max_new_tokens=16, stop=["\x00never", stop])))
    assert "".join(pieces) == base[:cut]
    result = engine.generate([request("Go on.", max_new_tokens=16, stop=[stop])])[0]
    assert result.text == base[:cut] and result.finish_reason == "stop"


def test_stop_string_helpers():
    assert find_stop("abcSTOPdef", ["STOP", "def"]) == 3
    assert find_stop("abc", ["x"]) is None
    assert holdback_start("hello ST", ["STOP"]) == 6
    assert holdback_start("hello", ["STOP"]) == 5
    stream = TextStream(lambda ids, skip_special_tokens=True: "".join(chr(i) for i in ids), ["END"])
    out = [stream.push(ord(c)) for c in "AEN"]
    assert out == ["A", "", ""]  # "EN" could still become "END"
    assert stream.push(ord("X")) == "ENX"
    assert [stream.push(ord(c)) for c in "ENDZ"] == ["", "", "", ""]
    assert stream.stopped and stream.text == "AENX"


def _byte_token_ids(tokenizer, text: str) -> list[int]:
    """``text`` as one byte-level BPE token per UTF-8 byte (GPT-2's byte-to-unicode map)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return [tokenizer.convert_tokens_to_ids(chr(chars[b])) for b in text.encode("utf-8")]


def test_streaming_never_splits_characters(model_and_processor):
    tokenizer = model_and_processor[1].tokenizer
    text = "Hi 👋🏽 世界, ça va? 🎉"
    ids = _byte_token_ids(tokenizer, text)
    assert len(ids) == len(text.encode("utf-8"))
    stream = TextStream(tokenizer.decode, ["va?"])
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "Hi 👋🏽 世界, ça " == stream.text
    stream = TextStream(tokenizer.decode)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces[3:7] == ["", "", "", "👋"]  # the emoji waits for its 4th byte


def test_stream_joins_to_result_text(engine):
    r = request("Describe.", IMAGES[1], max_new_tokens=14)
    events = list(engine.stream_events(r))
    assert events[-1].finished and events[-1].result is not None
    assert "".join(e.text for e in events) == events[-1].result.text
    assert "".join(engine.stream(fresh(r))) == events[-1].result.text
    timings = events[-1].result.timings
    assert timings.ttft_s > 0 and timings.total_s >= timings.ttft_s and timings.decode_tokens_per_s > 0


# ---- images ----------------------------------------------------------------------------


def test_feature_cache_skips_the_encoder(model_and_processor, engine):
    first = engine.generate([request("What is it?", IMAGES[0], max_new_tokens=6)])[0]
    assert engine.stats["encoder_calls"] == 1
    second = engine.generate([request("And the colours?", IMAGES[0], max_new_tokens=6)])[0]
    assert engine.stats["encoder_calls"] == 1 and engine.stats["feature_cache_hits"] == 1
    uncached = Engine(*model_and_processor, max_seq_len=256, feature_cache_size=0)
    again = uncached.generate([request("And the colours?", IMAGES[0], max_new_tokens=6)])[0]
    assert again.token_ids == second.token_ids and first.token_ids != second.token_ids
    # The same image in two requests admitted together is encoded once.
    together = Engine(*model_and_processor, max_seq_len=256)
    together.generate(
        [request("One?", IMAGES[2], max_new_tokens=2), request("Two?", IMAGES[2], max_new_tokens=2)]
    )
    assert together.stats["images_encoded"] == 1


def test_feature_cache_is_a_bounded_lru():
    cache = FeatureCache(2)
    for key in "abc":
        cache.put(key, torch.zeros(1))
    assert "a" not in cache and len(cache) == 2
    cache.get("b")
    cache.put("d", torch.zeros(1))
    assert "b" in cache and "c" not in cache
    for off in (FeatureCache(0), FeatureCache(4, max_bytes=0)):
        off.put("a", torch.zeros(1))
        assert len(off) == 0 and off.nbytes == 0


def test_feature_cache_holds_compact_copies_bounded_by_bytes():
    cache = FeatureCache(100, max_bytes=3 * 16 * 8 * 4)  # three (16, 8) float32 entries
    batch = torch.randn(8, 16, 8)  # what the encoder returns for 8 images
    for i in range(4):
        cache.put(str(i), batch[i])  # a view into the whole batch
    entry = cache.get("3")
    assert torch.equal(entry, batch[3]) and entry.untyped_storage().nbytes() == 16 * 8 * 4
    assert len(cache) == 3 and "0" not in cache and cache.nbytes == 3 * 16 * 8 * 4
    cache.put("3", batch[3])  # replacing an entry does not count it twice
    assert cache.nbytes == 3 * 16 * 8 * 4
    cache.put("big", torch.zeros(4 * 16 * 8))  # larger than the whole cache: not kept
    assert "big" not in cache and len(cache) == 3


# ---- scheduling --------------------------------------------------------------------------


def test_cancel_frees_the_slot(model_and_processor):
    eng = Engine(*model_and_processor, max_batch=1, max_seq_len=256)
    long_id = eng.add_request(request("Long.", IMAGES[0], max_new_tokens=50))
    short = request("Short.", max_new_tokens=5)
    eng.add_request(short)
    waiting_id = eng.add_request(request("Never runs.", max_new_tokens=5))
    eng.step()
    assert (eng.num_running, eng.num_waiting) == (1, 2)
    eng.cancel(long_id)
    eng.cancel(waiting_id)
    eng.cancel("no-such-request")  # ignored
    events = {e.request_id: e for e in eng.step()}
    assert events[long_id].result.finish_reason == "cancelled"
    assert len(events[long_id].result.token_ids) == 2  # prefill + one decode step
    assert events[waiting_id].result.finish_reason == "cancelled"
    assert events[waiting_id].result.usage.completion_tokens == 0
    assert eng.num_running == 1 and eng.num_waiting == 0  # the short request took the row
    results = {}
    while eng.has_work:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    alone = Engine(*model_and_processor, max_seq_len=256).generate([fresh(short)])[0]
    assert results[short.request_id].token_ids == alone.token_ids  # stale keys in the row are masked


def test_closing_a_stream_cancels_its_request(engine):
    stream = engine.stream(request("Talk.", max_new_tokens=40))
    next(stream)
    assert engine.num_running == 1
    stream.close()
    assert not engine.has_work


def test_context_length_error_before_any_compute(model_and_processor):
    eng = Engine(*model_and_processor, max_seq_len=64)
    with pytest.raises(ContextLengthError) as info:
        eng.add_request(request("Hello there.", IMAGES[0], max_new_tokens=60))
    assert "\n" not in str(info.value) and "64" in str(info.value)
    with pytest.raises(ContextLengthError):
        eng.add_request(request("Hello there.", max_new_tokens=5000))  # past the model's context
    assert not eng.has_work and eng.stats["encoder_calls"] == 0 and eng.stats["prompt_tokens"] == 0


def test_fitted_budget_shrinks_to_the_room_after_the_prompt(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    eng = Engine(model, processor, max_seq_len=64)
    encoded = []
    encode_prompt = processor.encode_prompt
    monkeypatch.setattr(processor, "encode_prompt", lambda p: encoded.append(p) or encode_prompt(p))
    unfit = dict(max_new_tokens=500, stop_token_ids=[])
    fitted = eng.generate([request("Hello there.", fit_to_context=True, **unfit)])[0]
    assert len(encoded) == 1  # the prompt is tokenized once, fitting included
    assert fitted.usage.total_tokens == 64 and fitted.finish_reason == "length"
    roomy = eng.generate([request("Hello there.", fit_to_context=True, max_new_tokens=3)])[0]
    assert roomy.usage.completion_tokens <= 3  # a ceiling below the room stays as it is
    with pytest.raises(ContextLengthError, match="500 new tokens"):
        eng.add_request(request("Hello there.", **unfit))  # without the flag nothing is fitted
    with pytest.raises(ContextLengthError, match="100 tokens, over the context limit of 64"):
        eng.add_request(request("long " * 80, fit_to_context=True, **unfit))  # no room at all


def test_bad_input_raises_at_add_request(engine):
    with pytest.raises(InputError, match="no image file"):
        engine.add_request(request("What?", "/no/such/image.png", max_new_tokens=8))
    with pytest.raises(InputError):
        request("What?", max_new_tokens=0)
    r = request("Hi.", max_new_tokens=2)
    engine.add_request(r)
    with pytest.raises(InputError, match="already in use"):
        engine.add_request(r)
    assert engine.num_waiting == 1


def test_compute_failure_fails_its_requests_with_a_final_event(engine, monkeypatch):
    ids = [
        engine.add_request(request("A.", max_new_tokens=5)),
        engine.add_request(request("B.", max_new_tokens=5)),
    ]

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "decode", broken)
    # One request is admitted per step, so each step fails the one it was decoding.
    for expected in ids:
        (event,) = engine.step()
        assert event.request_id == expected and event.finished
        assert isinstance(event.error, GenerationError) and "device lost" in str(event.error)
        assert event.result.finish_reason == "error"
    assert not engine.has_work and engine.stats["requests_failed"] == 2
