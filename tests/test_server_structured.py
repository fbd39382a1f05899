"""Structured output and the rest of the chat API over HTTP, with the ``openai`` client.

A random-weight model writes gibberish, so every answer that completes ("stop") and
still parses and validates under ``response_format`` / ``guided_*`` is the
constraint's doing. Log-probabilities are checked against a softmax over the model's
own logits, ``n`` against itself (same seed, same choices; choices differ), and
``logit_bias`` by forcing a token.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from fastvlm.generation.engine import Engine
from fastvlm.generation.sampling import SamplingParams
from test_server import MODEL, TIMEOUT, engine_answer, load_tiny, metrics, serve, wait_until
from test_structured import ARRAY, NESTED  # the engine tests' schemas, here through HTTP

SEEDS = range(4)
QUESTION = [{"role": "user", "content": "Fill in the form."}]
ENUM_NUMBER = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "total": {"type": "number", "minimum": 0, "maximum": 100},
        "paid": {"type": "boolean"},
    },
    "required": ["color", "total", "paid"],
    "additionalProperties": False,
}
SCHEMAS = {"nested": NESTED, "array": ARRAY, "enum_number": ENUM_NUMBER}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_tiny(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def live(tiny):
    model, processor = tiny
    with serve(model, processor, engine=Engine(model, processor, max_batch=8, max_seq_len=512)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return live.client()


def ask(client, **kwargs):
    kwargs = {"model": MODEL, "messages": QUESTION, "max_tokens": 64, "temperature": 1.0, **kwargs}
    return client.chat.completions.create(**kwargs)


def completed(replies) -> list[str]:
    """The text of every choice that ended with "stop"."""
    return [c.message.content for r in replies for c in r.choices if c.finish_reason == "stop"]


# ---- structured output ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    replies = [ask(client, response_format=fmt, seed=seed, n=2) for seed in SEEDS]
    done = completed(replies)
    assert len(done) >= len(SEEDS), [c.message.content for r in replies for c in r.choices]
    for text in done:
        jsonschema.validate(json.loads(text), schema)
    assert all(c.finish_reason in ("stop", "length") for r in replies for c in r.choices)


class Receipt(pydantic.BaseModel):
    paid: bool
    currency: str = pydantic.Field(max_length=3)
    items: int = pydantic.Field(ge=0, le=99)


def test_the_clients_parse_helper_gets_a_model(client):
    parsed = []
    for seed in SEEDS:
        try:
            reply = client.chat.completions.parse(
                model=MODEL, messages=QUESTION, response_format=Receipt, max_tokens=64, seed=seed
            )
        except openai.LengthFinishReasonError:  # the budget cut it: the client refuses to parse
            continue
        assert reply.choices[0].finish_reason == "stop"
        parsed.append(reply.choices[0].message.parsed)
    assert parsed and all(isinstance(p, Receipt) for p in parsed)


def test_json_object(client):
    replies = [ask(client, response_format={"type": "json_object"}, seed=s, max_tokens=32) for s in SEEDS]
    for reply in replies:
        text = reply.choices[0].message.content
        assert text.startswith("{")
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_guided_json_as_text(client):
    schema = SCHEMAS["enum_number"]
    replies = [ask(client, extra_body={"guided_json": json.dumps(schema)}, seed=s) for s in SEEDS]
    for text in completed(replies):
        jsonschema.validate(json.loads(text), schema)


def test_guided_choice_and_regex(client):
    choices = ["yes", "no", "not sure"]
    picks = [ask(client, extra_body={"guided_choice": choices}, seed=s) for s in SEEDS]
    assert all(
        r.choices[0].finish_reason == "stop" and r.choices[0].message.content in choices for r in picks
    )
    pattern = r"[A-Z]{2}-[0-9]{3}"  # \d would be any Unicode digit, as in Python's re
    replies = [ask(client, extra_body={"guided_regex": pattern}, seed=s, max_tokens=16) for s in SEEDS]
    assert len(completed(replies)) == len(SEEDS)
    assert all(re.fullmatch(pattern, text) for text in completed(replies))


def test_a_streamed_constrained_answer_is_the_same(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": NESTED}}
    whole = ask(client, response_format=fmt, seed=3, n=2)
    texts, reasons = ["", ""], ["", ""]
    for chunk in ask(client, response_format=fmt, seed=3, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_text_format_is_free_text(client):
    free = ask(client, temperature=0, max_tokens=8)
    text = ask(client, temperature=0, max_tokens=8, response_format={"type": "text"})
    assert free.choices[0].message.content == text.choices[0].message.content


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_keyword(client):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            ask(client, response_format=fmt, stream=stream)
        assert "uniqueItems" in info.value.body["message"]
        assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, extra_body={"guided_json": {"type": "string", "nullable": True}})
    assert "nullable" in info.value.body["message"] and info.value.body["param"] == "guided_json"


# ---- logprobs --------------------------------------------------------------------------------


def reference_logprobs(tiny, token_ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at each generated position, computed apart from the engine."""
    model, processor = tiny
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)[0]
    ids = torch.cat([prompt, torch.tensor(token_ids)])[None]  # (1, T + N)
    with torch.no_grad():
        logits = model(ids).logits[0, prompt.numel() - 1 : -1]  # (N, V): the scores of each generated token
    return logits.float().log_softmax(-1)


def test_logprobs_match_a_softmax_over_the_models_logits(client, tiny):
    reply = ask(
        client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    oracle = engine_answer(
        tiny, QUESTION, max_new_tokens=6, sampling=SamplingParams(temperature=0.0), stop_token_ids=[]
    )
    want = reference_logprobs(tiny, oracle.token_ids)  # (6, V)
    _, processor = tiny
    for position, (entry, token) in enumerate(zip(content, oracle.token_ids, strict=True)):
        assert bytes(entry.bytes).decode("utf-8", "replace") == processor.decode([token]) or entry.bytes
        assert entry.logprob == pytest.approx(want[position, token].item(), abs=1e-4)
        top = want[position].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_streamed_logprobs_are_the_same(client):
    kwargs = {"temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    whole = ask(client, **kwargs).choices[0].logprobs.content
    stream = ask(client, stream=True, **kwargs)
    pieces = [
        e
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in whole]
    assert [[t.token for t in e.top_logprobs] for e in pieces] == [
        [t.token for t in e.top_logprobs] for e in whole
    ]


def test_no_logprobs_unless_asked(client):
    assert ask(client, max_tokens=3).choices[0].logprobs is None


# ---- n ---------------------------------------------------------------------------------------


def test_n_choices_with_a_seed_are_reproducible_and_differ(client):
    kwargs = {"n": 3, "seed": 7, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    first, again = ask(client, **kwargs), ask(client, **kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3
    one = ask(client, max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    assert (
        first.usage.completion_tokens == 3 * 8 and first.usage.total_tokens == first.usage.prompt_tokens + 24
    )


def test_n_choices_stream_with_their_index(client):
    kwargs = {"n": 3, "seed": 11, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    whole = ask(client, **kwargs)
    stream = ask(client, stream=True, stream_options={"include_usage": True}, **kwargs)
    texts, reasons, usage = ["", "", ""], [[], [], []], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index].append(choice.finish_reason)
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [["length"]] * 3  # one finish chunk per choice
    assert usage.completion_tokens == 18 and usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_stream_ends_once_after_every_choice(live):
    body = {"model": MODEL, "messages": QUESTION, "n": 2, "max_tokens": 4, "stream": True, "seed": 1}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    assert chunks[-1]["choices"][0]["finish_reason"] is not None  # nothing after the last finish


def test_leaving_cancels_every_choice(live):
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "n": 3,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert wait_until(lambda: metrics(live.url)["fastvlm_running_requests"] == 3)
    assert wait_until(lambda: metrics(live.url)["fastvlm_running_requests"] == 0)


# ---- penalties and logit_bias ------------------------------------------------------------------


def margins(reply) -> list[float]:
    """At each position, the forced token's log-probability minus the best other token's."""
    return [
        e.logprob - max(t.logprob for t in e.top_logprobs if t.token != e.token)
        for e in reply.choices[0].logprobs.content
    ]


def test_penalties_lower_a_repeated_tokens_score_exactly(client, tiny):
    # logit_bias +100 makes every token "Yes"; the penalties then lower its score by
    # presence * 1 + frequency * count after each repetition, which the logprobs show.
    _, processor = tiny
    (token,) = processor.tokenizer.encode("Yes", add_special_tokens=False)
    kwargs = {"temperature": 0, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    kwargs |= {"logit_bias": {str(token): 100}, "extra_body": {"ignore_eos": True}}
    plain = margins(ask(client, **kwargs))
    presence = margins(ask(client, presence_penalty=2.0, **kwargs))
    frequency = margins(ask(client, frequency_penalty=1.5, **kwargs))
    both = margins(ask(client, presence_penalty=0.5, frequency_penalty=-1.0, **kwargs))
    for count in range(4):  # "Yes" was generated `count` times before this position
        assert presence[count] == pytest.approx(plain[count] - 2.0 * (count > 0), abs=1e-3)
        assert frequency[count] == pytest.approx(plain[count] - 1.5 * count, abs=1e-3)
        assert both[count] == pytest.approx(plain[count] - 0.5 * (count > 0) + 1.0 * count, abs=1e-3)


def test_logit_bias_forces_a_token(client, tiny):
    _, processor = tiny
    (token,) = processor.tokenizer.encode("Yes", add_special_tokens=False)
    reply = ask(
        client, logit_bias={str(token): 100}, max_tokens=4, logprobs=True, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].message.content == "Yes" * 4
    assert all(e.logprob > -1e-3 for e in reply.choices[0].logprobs.content)
    banned = ask(client, temperature=0, max_tokens=4, logit_bias={str(token): -100})
    assert "Yes" not in banned.choices[0].message.content


def test_a_failed_choice_fails_the_request_and_cancels_the_others(tiny, monkeypatch):
    engine = Engine(*tiny, max_batch=4)
    decode = engine.runner.decode

    def poisoned(tokens, lengths):
        logits = decode(tokens, lengths).clone()  # (B, V)
        logits[0, 7] = float("nan")  # row 0: one of the choices
        return logits

    monkeypatch.setattr(engine.runner, "decode", poisoned)
    body = {"model": MODEL, "messages": QUESTION, "n": 3, "max_tokens": 200, "ignore_eos": True}
    with serve(*tiny, engine=engine) as server:
        url = f"{server.url}/v1/chat/completions"
        response = httpx.post(url, json=body, timeout=TIMEOUT)
        assert response.status_code == 500 and response.json()["error"]["code"] == "non_finite_logits"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=TIMEOUT) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert '"non_finite_logits"' in events[-2] and events[-1] == "[DONE]"
        assert wait_until(lambda: metrics(server.url)["fastvlm_running_requests"] == 0)
        assert wait_until(lambda: metrics(server.url)["fastvlm_queue_length"] == 0)
        monkeypatch.undo()
        assert (
            server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, n=3).choices
        )
        assert not engine.has_work
