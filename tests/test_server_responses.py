"""Response bodies and the event stream for ``n`` choices and log-probabilities, from
hand-made engine results: the shapes OpenAI's clients parse, without a model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fastvlm.server.chat import _stream
from fastvlm.server.responses import FLOOR_LOGPROB, Completion
from fastvlm.server.tickets import Failed, Ticket


def top(token: str, logprob: float) -> SimpleNamespace:
    return SimpleNamespace(token_id=1, token=token, bytes=list(token.encode()), logprob=logprob)


def entry(token: str, logprob: float, *alternatives) -> SimpleNamespace:
    return SimpleNamespace(**vars(top(token, logprob)), top=list(alternatives))


def result(index: int, text: str, completion: int, logprobs=None, reason="stop") -> SimpleNamespace:
    usage = SimpleNamespace(prompt_tokens=10, completion_tokens=completion, total_tokens=10 + completion)
    return SimpleNamespace(index=index, text=text, finish_reason=reason, usage=usage, logprobs=logprobs)


def event(index: int, text: str, finished=None, logprobs=None) -> SimpleNamespace:
    return SimpleNamespace(
        index=index, text=text, finished=finished is not None, result=finished, logprobs=logprobs
    )


def test_n_choices_in_index_order_with_usage_counted_once():
    lp = [entry("Hi", -0.5, top("Hi", -0.5), top("Ho", float("-inf")))]
    body = Completion("m").body([result(1, "B", 3, reason="length"), result(0, "Hi", 1, lp)])
    parsed = ChatCompletion.model_validate(body)
    assert [c.index for c in parsed.choices] == [0, 1]
    assert [c.finish_reason for c in parsed.choices] == ["stop", "length"]
    assert parsed.usage.prompt_tokens == 10 and parsed.usage.completion_tokens == 4
    assert parsed.usage.total_tokens == 14
    first = parsed.choices[0].logprobs.content[0]
    assert (first.token, first.logprob, first.bytes) == ("Hi", -0.5, [72, 105])
    assert [t.logprob for t in first.top_logprobs] == [-0.5, FLOOR_LOGPROB]  # JSON has no -inf
    assert parsed.choices[1].logprobs is None
    json.dumps(body, allow_nan=False)


def run_stream(choices: int, items: list, include_usage: bool = True) -> list:
    async def go():
        ticket = Ticket(asyncio.get_running_loop(), choices=choices)
        for item in items:
            ticket.inbox.put_nowait(item)
        return [chunk async for chunk in _stream(ticket, Completion("m"), include_usage)]

    frames = asyncio.run(go())
    assert frames[-1] == b"data: [DONE]\n\n" and frames.count(frames[-1]) == 1
    return [json.loads(f[6:]) for f in frames[:-1]]


def test_stream_tags_choices_and_ends_once_after_all():
    lp = [entry("a", -1.0)]
    items = [
        event(1, "b"),
        event(0, "a", logprobs=lp),
        event(0, "", finished=result(0, "a", 1)),
        event(1, "c", finished=result(1, "bc", 2, reason="length")),
    ]
    chunks = run_stream(2, items)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1]
    text = {0: "", 1: ""}
    for c in chunks[:-1]:
        text[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert text == {0: "a", 1: "bc"}
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert [f for f in finishes if f[1]] == [(0, "stop"), (1, "length")]
    assert chunks[3]["choices"][0]["logprobs"]["content"][0]["token"] == "a"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])


def test_a_failed_choice_ends_the_stream():
    items = [event(0, "a"), Failed("the engine failed", 503, text="x")]
    chunks = run_stream(2, items, include_usage=False)
    assert chunks[-1]["error"]["code"] == "engine_error"
    assert sum(bool(c.get("choices") and c["choices"][0]["finish_reason"]) for c in chunks[:-1]) == 0
