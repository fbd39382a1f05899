"""``n`` choices per request: one prefill and one image encoding, then n rows.

The reference for each choice is the same request with n=1 and the choice's derived
seed, run alone: copying the prefilled cache row must not change any answer.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

import builders
import fastvlm
from fastvlm import FastVLM
from fastvlm.errors import InputError
from fastvlm.generation.engine import Engine, GenerationRequest
from fastvlm.generation.sampling import SamplingParams
from fastvlm.generation.sequence import choice_seed
from fastvlm.processing import FastVLMProcessor

IMAGE = str(builders.shared_assets() / "images" / "waterview.jpg")


def messages(text: str = "Describe the picture.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint_dir):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype="float32", device="cpu", progress=False)
    return model, FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)


def make_engine(model_and_processor, max_batch: int = 4, **kwargs) -> Engine:
    return Engine(*model_and_processor, max_batch=max_batch, max_seq_len=256, feature_cache_size=0, **kwargs)


def sampled(n: int, seed: int = 7, tokens: int = 10, **kwargs) -> GenerationRequest:
    params = SamplingParams(temperature=1.0, seed=seed)
    return GenerationRequest(messages(), tokens, params, stop_token_ids=[], n=n, **kwargs)


def alone(model_and_processor, request: GenerationRequest, index: int):
    """Choice ``index`` of ``request`` as a request of its own: n=1 with the derived seed."""
    seed = choice_seed(request.sampling.seed, index)
    single = replace(request, n=1, sampling=replace(request.sampling, seed=seed), request_id="alone")
    return make_engine(model_and_processor, max_batch=1).generate([single])[0]


@pytest.mark.slow
def test_seeded_choices_are_reproducible_distinct_and_exact(model_and_processor):
    engine = make_engine(model_and_processor)
    first = engine.generate([sampled(3)])
    again = engine.generate([sampled(3)])
    assert [r.index for r in first] == [0, 1, 2]
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in first}) == 3  # the choices differ
    for i, result in enumerate(first):
        assert result.token_ids == alone(model_and_processor, sampled(3), i).token_ids
    # Choice 0 is what the request answers with n=1.
    assert first[0].token_ids == engine.generate([sampled(1)])[0].token_ids


@pytest.mark.slow
def test_choices_share_one_prefill_and_one_image_encoding(model_and_processor):
    engine = make_engine(model_and_processor)
    engine.generate([sampled(3)])
    shared = dict(engine.stats)
    separate = make_engine(model_and_processor)
    separate.generate([sampled(1, seed=s) for s in range(3)])
    assert (shared["prefills"], shared["encoder_calls"], shared["images_encoded"]) == (1, 1, 1)
    assert (separate.stats["prefills"], separate.stats["images_encoded"]) == (3, 3)
    assert shared["prompt_tokens"] * 3 == separate.stats["prompt_tokens"]
    assert shared["requests_finished"] == 3 and shared["generated_tokens"] == 30


@pytest.mark.slow
def test_choices_wait_for_rows_and_join_a_busy_batch(model_and_processor):
    """3 rows for n=2, n=1 and n=3 requests: the n=3 one waits until three rows are free."""
    requests = [sampled(2, seed=1, tokens=6), sampled(1, seed=2, tokens=12), sampled(3, seed=3, tokens=5)]
    engine = make_engine(model_and_processor, max_batch=3, prefill_per_step=3)
    results = engine.generate(requests)
    assert [(r.request_id, r.index) for r in results] == [
        (requests[0].request_id, 0), (requests[0].request_id, 1), (requests[1].request_id, 0),
        (requests[2].request_id, 0), (requests[2].request_id, 1), (requests[2].request_id, 2),
    ]  # fmt: skip
    expected = [alone(model_and_processor, r, i).token_ids for r in requests for i in range(r.n)]
    assert [r.token_ids for r in results] == expected
    assert not engine.has_work


@pytest.mark.slow
def test_a_choice_that_stops_on_its_first_token_frees_its_row(model_and_processor):
    """Choice 0 stops at once; choices 1 and 2 take the prefilled row and a copy of it."""
    free = make_engine(model_and_processor).generate([sampled(3)])
    stop = free[0].token_ids[0]
    assert all(stop not in r.token_ids for r in free[1:])
    engine = make_engine(model_and_processor)
    stopped = engine.generate([replace(sampled(3), stop_token_ids=[stop])])
    assert stopped[0].finish_reason == "stop" and stopped[0].token_ids == []
    assert [r.token_ids for r in stopped[1:]] == [r.token_ids for r in free[1:]]


def test_greedy_choices_agree_and_logprobs_are_per_choice(model_and_processor):
    engine = make_engine(model_and_processor)
    greedy = GenerationRequest(messages(), 6, n=2, logprobs=True, top_logprobs=2)
    a, b = engine.generate([greedy])
    assert a.token_ids == b.token_ids and len(a.logprobs) == len(b.logprobs) == 6
    assert [e.logprob for e in a.logprobs] == [e.logprob for e in b.logprobs]
    assert a.logprobs is not b.logprobs


def test_cancel_ends_every_choice_once(model_and_processor):
    engine = make_engine(model_and_processor)
    request_id = engine.add_request(sampled(3, tokens=50))
    ends = {}
    for step in range(4):
        if step == 2:
            engine.cancel(request_id)
        for event in engine.step():
            if event.finished:
                assert event.index not in ends
                ends[event.index] = event.result.finish_reason
    assert ends == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
    assert not engine.has_work and engine.num_running == 0


def test_streamed_choices_carry_their_index(model_and_processor):
    engine = make_engine(model_and_processor)
    events = list(engine.stream_events(sampled(2, tokens=8)))
    for index in (0, 1):
        mine = [e for e in events if e.index == index]
        assert [e.finished for e in mine].count(True) == 1 and mine[-1].finished
        assert "".join(e.text for e in mine) == mine[-1].result.text
    with pytest.raises(InputError, match="for n > 1 use stream_events"):
        engine.stream(sampled(2))


def test_bad_n_is_a_one_line_error(model_and_processor):
    for bad in (0, 9, 2.0, True):
        with pytest.raises(InputError, match=r"n must be an integer in \[1, 8\]"):
            GenerationRequest(messages(), n=bad)
    with pytest.raises(InputError, match="n=5 choices need 5 rows; this engine has 4") as info:
        make_engine(model_and_processor).prepare(sampled(5))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_python_api_options(tiny_checkpoint_dir):
    vlm = fastvlm.load(tiny_checkpoint_dir, device="cpu", dtype="float32", progress=False, max_batch=4)
    answers = vlm.ask(IMAGE, "Describe it.", n=3, temperature=1.0, seed=1, max_new_tokens=6)
    assert isinstance(answers, list) and len(answers) == 3 and len(set(answers)) == 3
    results = vlm.chat(
        messages(), n=2, seed=1, temperature=1.0, max_new_tokens=6, logprobs=True, top_logprobs=3
    )
    assert [r.index for r in results] == [0, 1] and all(len(r.logprobs[0].top) == 3 for r in results)
    biased = vlm.chat(messages(), max_new_tokens=3, logit_bias={"9707": 100}, presence_penalty=0.5)
    assert biased.token_ids == [9707] * 3
    batch = vlm.batch([messages(), {"messages": messages(), "n": 2}], max_new_tokens=3)
    assert not isinstance(batch[0], list) and [r.index for r in batch[1]] == [0, 1]
    with pytest.raises(InputError, match="ask returns text only"):
        vlm.ask(IMAGE, "Hi.", logprobs=True)
    with pytest.raises(InputError, match=r"for n > 1 call chat\(..., stream=True\)"):
        vlm.ask(IMAGE, "Hi.", n=2, stream=True)
    events = list(vlm.chat(messages(), n=2, stream=True, max_new_tokens=3))
    assert sorted(e.index for e in events if e.finished) == [0, 1]
    with pytest.raises(InputError, match="frequency_penalty must be in"):
        vlm.chat(messages(), frequency_penalty=3)
