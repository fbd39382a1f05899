"""OpenAI's sampling extras in the engine: presence/frequency penalties, logit_bias, logprobs.

The references are written here, independently of the engine: the penalties as
OpenAI states them and a log-softmax, applied to logits from the plain full-sequence
forward of the same model on the same prompt and tokens.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastvlm import FastVLM
from fastvlm.errors import InputError
from fastvlm.generation.engine import Engine, GenerationRequest
from fastvlm.generation.sampling import SamplingParams, row_scores, sample_rows
from fastvlm.processing import FastVLMProcessor

PROMPT = [{"role": "user", "content": "Write a list of fruits and colours."}]


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint_dir):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype="float32", device="cpu", progress=False)
    return model, FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)


@pytest.fixture
def engine(model_and_processor):
    return Engine(*model_and_processor, max_batch=4, max_seq_len=256, feature_cache_size=0)


def run(engine: Engine, max_new_tokens: int = 12, logprobs: int | None = None, **sampling):
    """``logprobs``: None for none, else how many alternatives (top_logprobs)."""
    extra = {} if logprobs is None else {"logprobs": True, "top_logprobs": logprobs}
    params = SamplingParams(**sampling)
    request = GenerationRequest(PROMPT, max_new_tokens, params, stop_token_ids=[], **extra)
    return engine.generate([request])[0]


def step_logits(model_and_processor, token_ids: list[int]) -> torch.Tensor:
    """(N, V) float32 logits that scored each of the N generated tokens, from one plain forward."""
    model, processor = model_and_processor
    template = {"add_generation_prompt": True, "tokenize": True, "return_dict": True}
    prompt = processor.apply_chat_template(PROMPT, **template)
    ids = torch.cat([prompt["input_ids"][0], torch.tensor(token_ids)])[None]  # (1, T + N)
    T = prompt["input_ids"].shape[1]
    with torch.inference_mode():
        logits = model(ids).logits[0].float()  # (T + N, V)
    return logits[T - 1 : T - 1 + len(token_ids)]  # (N, V)


def openai_penalties(logits: torch.Tensor, previous: list[int], presence: float, frequency: float):
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, with c counting ``previous``."""
    out = logits.clone()
    for token in set(previous):
        c = previous.count(token)
        out[token] -= c * frequency + presence
    return out


# ---- penalties -------------------------------------------------------------------------


def test_penalties_on_recorded_logits_match_openai_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)  # (B, V)
    generated = [[1, 1, 4], [], [7, 7, 7, 2]]
    counts = [torch.bincount(torch.tensor(g, dtype=torch.long), minlength=50).float() for g in generated]
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4)
    for row in range(3):
        got = row_scores(logits[row], p, counts=counts[row])
        want = openai_penalties(logits[row], generated[row], 0.7, -0.4)
        torch.testing.assert_close(got, want)
    # Greedy rows with a penalty leave the shared argmax and pick the penalised best.
    logits[0, 1] = 10.0  # best before the penalty, and penalised below the second best
    logits[0, 2] = 9.5
    p = SamplingParams(presence_penalty=2.0, frequency_penalty=0.0)
    tokens, failed, logprobs = sample_rows(logits, [p] * 3, [None] * 3, [None] * 3, counts=counts)
    assert not failed and not logprobs and tokens[0] == 2


def test_greedy_penalties_match_the_plain_forward(engine, model_and_processor):
    plain = run(engine, 16).token_ids
    # Random weights rarely repeat a token; negative penalties make them, so the counts matter.
    settings = {"presence_penalty": -1.5, "frequency_penalty": 0.4, "repetition_penalty": 1.2}
    result = run(engine, 16, **settings)
    assert result.token_ids != plain and len(set(result.token_ids)) < 16
    logits = step_logits(model_and_processor, result.token_ids)
    prompt = engine.prepare(GenerationRequest(PROMPT, 4)).prompt_ids
    for i, token in enumerate(result.token_ids):
        generated = result.token_ids[:i]
        # CTRL repetition penalty over prompt and generated ids, as transformers applies it.
        scores = logits[i].clone()
        for t in set(prompt.tolist() + generated):
            scores[t] = scores[t] * 1.2 if scores[t] < 0 else scores[t] / 1.2
        scores = openai_penalties(scores, generated, -1.5, 0.4)
        assert int(scores.argmax()) == token, f"token {i}"


def test_frequency_penalty_counts_generated_tokens_only(engine):
    # Nothing generated yet: the first token cannot be penalised, whatever the prompt holds.
    first = run(engine, 1).token_ids
    assert run(engine, 1, presence_penalty=2.0, frequency_penalty=2.0).token_ids == first


# ---- logit_bias ------------------------------------------------------------------------


def test_logit_bias_forces_and_bans(engine):
    forced = 9707  # an ordinary token ("Hello")
    for sampling in [{}, {"temperature": 1.0, "seed": 3}]:
        result = run(engine, 6, logit_bias={forced: 100}, **sampling)
        assert result.token_ids == [forced] * 6
    plain = run(engine, 12).token_ids
    banned = set(plain[:3])
    result = run(engine, 12, logit_bias={t: -100 for t in banned})
    assert result.token_ids and not banned & set(result.token_ids)
    # Sampled at a high temperature the ban holds too.
    hot = run(engine, 24, temperature=1.5, seed=0, logit_bias=dict.fromkeys(banned, -100))
    assert not banned & set(hot.token_ids)


def test_logit_bias_keys_as_strings_and_frozen_copy():
    bias = {"42": 5}
    p = SamplingParams(logit_bias=bias)
    bias["42"] = 100  # a caller changing its dict later changes nothing
    assert p.logit_bias == {42: 5.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
    hash(p)  # a frozen settings object stays hashable


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(presence_penalty=2.5), "presence_penalty must be in"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
        (dict(frequency_penalty="1"), "frequency_penalty must be a finite number"),
        (dict(logit_bias={5: 101}), r"logit_bias\[5\] must be in \[-100, 100\]"),
        (dict(logit_bias={-1: 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
        (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
        (dict(logit_bias={5: None}), r"logit_bias\[5\] must be a number"),
    ],
)
def test_bad_settings_are_one_line_input_errors(bad, match):
    with pytest.raises(InputError, match=match) as info:
        SamplingParams(**bad)
    assert "\n" not in str(info.value)


def test_logit_bias_ids_are_checked_against_the_vocabulary(engine):
    vocab = engine.runner.vocab_size
    request = GenerationRequest(PROMPT, 4, SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(InputError, match=f"token id {vocab}, but this model's ids are 0..{vocab - 1}"):
        engine.prepare(request)
    engine.prepare(replace(request, sampling=SamplingParams(logit_bias={vocab - 1: 1.0})))


# ---- logprobs --------------------------------------------------------------------------

LOGPROB_CASES = {
    "greedy": ({}, 1.0),
    "sampled": ({"temperature": 0.7, "seed": 1}, 0.7),
    "truncated": ({"temperature": 1.3, "top_k": 8, "top_p": 0.9, "seed": 2}, 1.3),  # before truncation
    "penalised": ({"frequency_penalty": -0.8, "presence_penalty": 0.3, "logit_bias": {9707: 3.0}}, 1.0),
}


@pytest.mark.parametrize("case", LOGPROB_CASES)
def test_logprobs_are_log_softmax_of_the_plain_forward(engine, model_and_processor, case):
    sampling, temperature = LOGPROB_CASES[case]
    result = run(engine, 10, logprobs=5, **sampling)
    assert len(result.logprobs) == len(result.token_ids) == 10
    logits = step_logits(model_and_processor, result.token_ids)
    bias = sampling.get("logit_bias", {})
    presence, frequency = sampling.get("presence_penalty", 0.0), sampling.get("frequency_penalty", 0.0)
    for i, (token, entry) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        scores = logits[i].clone()
        for t, b in bias.items():
            scores[t] += b
        scores = openai_penalties(scores, result.token_ids[:i], presence, frequency)
        want = torch.log_softmax(scores / temperature, -1)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(want[token].item(), abs=1e-4)
        top_values, top_ids = want.topk(5)
        assert [t.token_id for t in entry.top] == top_ids.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.top[0].logprob >= entry.logprob
        if "temperature" not in sampling:
            assert entry.top[0].token_id == token  # greedy picks the most likely


def test_logprob_tokens_spell_the_text(engine, model_and_processor):
    result = run(engine, 16, logprobs=2, temperature=1.0, seed=5)
    raw = b"".join(bytes(entry.bytes) for entry in result.logprobs)
    tokenizer = model_and_processor[1].tokenizer
    assert raw.decode("utf-8", errors="replace") == tokenizer.decode(result.token_ids)
    for entry in [*result.logprobs, *(t for e in result.logprobs for t in e.top)]:
        assert bytes(entry.bytes).decode("utf-8", errors="backslashreplace") == entry.token


def test_token_bytes_agree_with_the_tokenizer(model_and_processor):
    from fastvlm.processing.token_bytes import TokenBytes

    tokenizer = model_and_processor[1].tokenizer
    spell = TokenBytes(tokenizer)
    for token_id in [*range(0, len(tokenizer), 97), 151643, 151645]:
        text, raw = spell(token_id)
        assert raw.decode("utf-8", errors="replace") == tokenizer.decode([token_id]), token_id
    assert spell(220) == (" ", b" ")
    assert spell(151645) == ("<|im_end|>", b"<|im_end|>")
    assert spell(10**6) == ("", b"")  # a padded vocabulary row the tokenizer does not know


def test_streamed_logprobs_add_up_and_a_stop_token_has_none(engine):
    request = GenerationRequest(PROMPT, 12, SamplingParams(seed=4, temperature=0.9), logprobs=True)
    events = list(engine.stream_events(request))
    streamed = [entry for event in events for entry in (event.logprobs or [])]
    result = events[-1].result
    assert [e.token_id for e in streamed] == result.token_ids
    assert streamed == result.logprobs and all(e.top == [] for e in streamed)  # top_logprobs=0
    # A stop token ends the answer and, like token_ids, gets no entry.
    stopped = run(engine, 5, logprobs=3, logit_bias={151645: 100.0})
    assert stopped.finish_reason == "length"  # run() lists no stop ids
    request = GenerationRequest(PROMPT, 5, SamplingParams(logit_bias={151645: 100.0}), logprobs=True)
    (stopped,) = engine.generate([request])
    assert stopped.finish_reason == "stop" and stopped.token_ids == [] and stopped.logprobs == []
    assert run(engine, 3).logprobs is None  # not asked for, not paid for


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(logprobs=True, top_logprobs=21), r"top_logprobs must be an integer in \[0, 20\]"),
        (dict(logprobs=True, top_logprobs=-1), "top_logprobs must be"),
        (dict(top_logprobs=3), "top_logprobs needs logprobs=True"),
        (dict(logprobs="yes"), "logprobs must be True or False"),
    ],
)
def test_bad_logprob_settings(bad, match):
    with pytest.raises(InputError, match=match):
        GenerationRequest(PROMPT, **bad)


def test_mixed_batch_rows_answer_what_they_answer_alone(model_and_processor):
    def requests():
        plain = GenerationRequest(PROMPT, 8)
        sampled = GenerationRequest(PROMPT, 8, SamplingParams(temperature=0.8, seed=9))
        extras = SamplingParams(temperature=0.8, seed=9, frequency_penalty=-1.0, logit_bias={11: 2.0})
        fancy = GenerationRequest(PROMPT, 8, extras, logprobs=True, top_logprobs=3)
        greedy_lp = GenerationRequest(PROMPT, 8, SamplingParams(presence_penalty=-1.0), logprobs=True)
        return [plain, sampled, fancy, greedy_lp]

    alone = [Engine(*model_and_processor, max_batch=1, max_seq_len=256).generate([r])[0] for r in requests()]
    together = Engine(*model_and_processor, max_batch=4, max_seq_len=256, prefill_per_step=4)
    results = together.generate(requests())
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    for got, want in zip(results[2:], alone[2:], strict=True):
        want_logprobs = [e.logprob for e in want.logprobs]
        assert [e.logprob for e in got.logprobs] == pytest.approx(want_logprobs, abs=1e-5)
