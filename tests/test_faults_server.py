"""Faults through the worker and the HTTP server: every ticket gets exactly one final
item and its slot back; a client whose neighbour fails gets its answer, and a failed
request gets a clear error (400 its content, 503 retry, 500 our bug), never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import fastapi  # noqa: F401  (the test extra installs the server; a missing one must fail, not skip)
import httpx  # noqa: E402
import openai
import pytest

import builders  # noqa: E402
from fastvlm.errors import InputError  # noqa: E402
from fastvlm.generation import detokenize, sampling  # noqa: E402
from fastvlm.generation.engine import Engine, GenerationError, GenerationRequest  # noqa: E402
from fastvlm.generation.request import StreamEvent  # noqa: E402
from fastvlm.generation.sampling import SamplingParams  # noqa: E402
from fastvlm.server.worker import Accepted, EngineWorker, Failed, Rejected  # noqa: E402
from test_faults import fail_once  # noqa: E402
from test_server import MODEL, TIMEOUT, data_uri, image_message, load_tiny, metrics, serve  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_tiny(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def cat_png() -> bytes:
    return (builders.shared_assets() / "images" / "000000039769.png").read_bytes()


def text_request(text: str, max_new_tokens: int, **kwargs) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], max_new_tokens, stop_token_ids=[], **kwargs)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def is_final(item) -> bool:
    return isinstance(item, (Rejected, Failed)) or (isinstance(item, StreamEvent) and item.finished)


async def final_item(ticket, timeout: float = 5.0):
    """The ticket's final item; then checks that nothing follows it."""

    async def until_final():
        while not is_final(item := await ticket.get()):
            pass
        return item

    item = await asyncio.wait_for(until_final(), timeout)
    await asyncio.sleep(0.05)
    assert ticket.inbox.empty(), "an item after the final one"
    return item


def decode_fails_after_a_one_token_prefill(engine: Engine, error: Exception) -> None:
    """Make the decode fail in the very step that prefills a request of one token."""
    prefill, decode, armed = engine.runner.prefill, engine.runner.decode, []

    def watched_prefill(row, ids, features):
        armed.extend(s for s in engine.scheduler.live() if s.max_new_tokens == 1 and s.row == row)
        return prefill(row, ids, features)

    def failing_decode(tokens, lengths):
        if armed:
            armed.clear()
            raise error
        return decode(tokens, lengths)

    engine.runner.prefill, engine.runner.decode = watched_prefill, failing_decode


def test_worker_ends_a_request_that_finished_in_a_failing_step(tiny):
    engine = Engine(*tiny, max_batch=2)
    worker = EngineWorker(engine, max_queue=4)
    decode_fails_after_a_one_token_prefill(engine, GenerationError("injected"))
    worker.start()

    async def scenario():
        loop = asyncio.get_running_loop()
        long = worker.submit(text_request("A.", 400), loop)
        assert isinstance(await long.get(), Accepted)
        await long.get()  # it is decoding
        short = worker.submit(text_request("B.", 1), loop)
        return await final_item(short), await final_item(long)

    try:
        short_end, long_end = asyncio.run(scenario())
    finally:
        worker.stop()
    assert short_end.error is None and short_end.result.finish_reason == "length"
    assert isinstance(long_end, Failed) and long_end.status == 503
    assert worker.active == 0 and not engine.has_work


POINTS = {
    "encode": lambda e: (e.runner, "encode_images"),
    "prefill": lambda e: (e.runner, "prefill"),
    "decode": lambda e: (e.runner, "decode"),
    "sample": lambda e: (sampling, "sample_next"),
    "detokenise": lambda e: (detokenize.TextStream, "push"),
    "stop": lambda e: (detokenize, "find_stop"),
}
STATUS = {GenerationError: 503, InputError: 400, RuntimeError: 500}


@pytest.mark.parametrize("error_type", list(STATUS), ids=lambda t: t.__name__)
@pytest.mark.parametrize("point", list(POINTS))
def test_worker_gives_every_ticket_one_final_item(tiny, monkeypatch, cat_png, point, error_type):
    engine = Engine(*tiny, max_batch=2, max_seq_len=256, feature_cache_size=0, prefill_per_step=2)
    owner, name = POINTS[point](engine)
    monkeypatch.setattr(
        owner, name, fail_once(getattr(owner, name), error_type("injected"), 2 if point == "encode" else 3)
    )
    worker = EngineWorker(engine, max_queue=4)
    worker.start()
    image = [{"type": "image", "image": cat_png}, {"type": "text", "text": "Hm?"}]
    params = SamplingParams(temperature=0.7, seed=1)
    requests = [GenerationRequest([{"role": "user", "content": image}], 6, params) for _ in range(3)]

    async def scenario():
        loop = asyncio.get_running_loop()
        tickets = [worker.submit(r, loop) for r in requests]
        return await asyncio.gather(*(final_item(t, timeout=20) for t in tickets))

    try:
        ends = asyncio.run(scenario())
    finally:
        worker.stop()
    failed = [e for e in ends if isinstance(e, Failed)]
    assert failed and all(not isinstance(e, Rejected) for e in ends)
    # A model call's plain error is a compute failure (retry); elsewhere it is a bug of ours.
    compute = point in ("encode", "prefill", "decode")
    expected = 503 if error_type is RuntimeError and compute else STATUS[error_type]
    assert {f.status for f in failed} == {expected}
    assert wait_until(lambda: worker.active == 0) and not engine.has_work


def test_worker_prepares_off_the_engine_thread_and_bugs_are_500(tiny, monkeypatch, caplog, cat_png):
    engine = Engine(*tiny, max_batch=2)
    processor = engine.processor
    threads, template = [], processor.apply_chat_template

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return template(*args, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", recorded)
    worker = EngineWorker(engine, max_queue=4)
    worker.start()
    image = [{"type": "image", "image": cat_png}, {"type": "text", "text": "Hm?"}]

    async def scenario():
        loop = asyncio.get_running_loop()
        good = await final_item(
            worker.submit(GenerationRequest([{"role": "user", "content": image}], 3), loop)
        )
        bad_input = await final_item(worker.submit(text_request("x", 10**6), loop))
        monkeypatch.setattr(engine, "prepare", lambda r: {}["a bug"])
        bug = await final_item(worker.submit(text_request("x", 3), loop))
        return good, bad_input, bug

    try:
        with caplog.at_level(logging.ERROR, logger="fastvlm.server"):
            good, bad_input, bug = asyncio.run(scenario())
    finally:
        worker.stop()
    assert threads and all(name.startswith("fastvlm-prepare") for name in threads)
    assert good.result.finish_reason == "length"
    assert isinstance(bad_input, Rejected)  # the client's fault: a 4xx
    assert isinstance(bug, Failed) and bug.status == 500 and "KeyError" in bug.message
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)  # the traceback is logged
    assert worker.active == 0


def test_cancel_while_preparing_frees_the_slot(tiny, monkeypatch):
    engine = Engine(*tiny, max_batch=2)
    prepare, gate = engine.prepare, threading.Event()
    monkeypatch.setattr(engine, "prepare", lambda r: gate.wait(5) and prepare(r))
    worker = EngineWorker(engine, max_queue=4)
    worker.start()

    async def scenario():
        ticket = worker.submit(text_request("Hi.", 5), asyncio.get_running_loop())
        worker.cancel(ticket)
        await asyncio.sleep(0.2)
        gate.set()

    try:
        asyncio.run(scenario())
        assert wait_until(lambda: worker.active == 0)
        assert not engine.has_work and engine.stats["prompt_tokens"] == 0
    finally:
        worker.stop()


# ---- over HTTP, with the openai client ---------------------------------------------------


def test_http_neighbour_of_a_failing_step_gets_its_answer(tiny):
    engine = Engine(*tiny, max_batch=2)
    decode_fails_after_a_one_token_prefill(engine, GenerationError("injected"))
    with serve(*tiny, engine=engine) as server:
        client = server.client()
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A."}], max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        assert wait_until(lambda: engine.num_running == 1)
        short = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "B."}], max_tokens=1, timeout=10
        )
        assert short.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIError, match="retry"):
            for _ in stream:
                pass
        assert wait_until(lambda: server_idle(server.url))


def server_idle(url: str) -> bool:
    m = metrics(url)
    return m["fastvlm_running_requests"] == 0 and m["fastvlm_queue_length"] == 0


@pytest.mark.parametrize(
    ("point", "error", "status"),
    [
        ("decode", GenerationError("injected"), 503),
        ("sample", InputError("injected"), 400),
        ("detokenise", RuntimeError("injected"), 500),
    ],
)
def test_http_failure_statuses_and_bodies(tiny, monkeypatch, point, error, status):
    engine = Engine(*tiny, max_batch=2)
    owner, name = POINTS[point](engine)
    monkeypatch.setattr(owner, name, fail_once(getattr(owner, name), error, 1))
    with serve(*tiny, engine=engine) as server:
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 5,
                "temperature": 0.7, "seed": 1,
            },
            timeout=TIMEOUT,
        )  # fmt: skip
        assert response.status_code == status
        body = response.json()["error"]
        assert body["message"] and body["type"] == (
            "server_error" if status >= 500 else "invalid_request_error"
        )
        assert wait_until(lambda: server_idle(server.url))
        # Served again at once.
        again = server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=3
        )
        assert again.choices[0].message.content is not None


def test_http_internal_bug_while_preparing_is_a_500(tiny, monkeypatch):
    engine = Engine(*tiny, max_batch=2)
    monkeypatch.setattr(engine, "prepare", lambda r: {}["a bug"])
    with serve(*tiny, engine=engine) as server:
        with pytest.raises(openai.InternalServerError) as info:
            server.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=3
            )
        assert info.value.status_code == 500
        assert info.value.body["code"] == "internal_error"


def test_metrics_show_the_feature_cache(tiny, cat_png):
    with serve(*tiny) as server:
        client = server.client()
        for question in ("One?", "Two?"):
            client.chat.completions.create(
                model=MODEL, messages=image_message(data_uri(cat_png), question), max_tokens=2
            )
        m = metrics(server.url)
    assert m["fastvlm_feature_cache_entries"] == 1 and m["fastvlm_feature_cache_bytes"] > 0
    assert m["fastvlm_feature_cache_hit_rate"] == 0.5
    assert m["fastvlm_feature_cache_max_bytes"] >= m["fastvlm_feature_cache_bytes"]


def test_http_non_finite_row_and_extreme_penalty(tiny, monkeypatch):
    engine = Engine(*tiny, max_batch=2)
    decode = engine.runner.decode

    def poisoned(tokens, lengths):
        logits = decode(tokens, lengths).clone()  # (B, V)
        logits[0, 7] = float("nan")  # row 0: the first request admitted
        return logits

    monkeypatch.setattr(engine.runner, "decode", poisoned)
    with serve(*tiny, engine=engine) as server:
        url = f"{server.url}/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 5}
        response = httpx.post(url, json=body, timeout=TIMEOUT)
        assert response.status_code == 500 and response.json()["error"]["code"] == "non_finite_logits"
        extreme = {**body, "repetition_penalty": 1e-38, "temperature": 0.1, "seed": 1}
        assert httpx.post(url, json=extreme, timeout=TIMEOUT).status_code == 400
        assert wait_until(lambda: server_idle(server.url))
