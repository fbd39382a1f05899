"""Hostile requests against a real server on a loopback port: each gets a clear 4xx (or a
normal answer), fast, with bounded memory, and the other clients' streams carry on.

The harness (uvicorn in a thread with the same configuration ``fastvlm serve`` uses,
a tiny random-weight checkpoint with the real tokenizer) is ``test_server``'s.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastapi  # noqa: F401  (the test extra installs the server; a missing one must fail, not skip)
import httpx  # noqa: E402
import pytest

import builders  # noqa: E402
from fastvlm.server.request_id import RequestIdFilter  # noqa: E402
from fastvlm.server.serving import ConnectionLimits  # noqa: E402
from test_server import (  # noqa: E402
    MODEL,
    TIMEOUT,
    _png,
    _request,
    data_uri,
    free_port,
    image_message,
    load_tiny,
    serve,
    wait_until,
)

HEAD_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_tiny(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def live(tiny):
    model, processor = tiny
    limits = ConnectionLimits(head_timeout_s=HEAD_TIMEOUT_S, keep_alive_s=1)
    with serve(
        model, processor, max_batch=4, max_queue=8, body_timeout_s=BODY_TIMEOUT_S, limits=limits
    ) as server:
        yield server


def post(url: str, body, **kwargs) -> httpx.Response:
    """POST ``body`` (a dict, sent as JSON with \\u escapes, or raw bytes) to the chat route."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = kwargs.pop("headers", {"content-type": "application/json"})
    return httpx.post(
        f"{url}/v1/chat/completions", content=content, headers=headers, timeout=TIMEOUT, **kwargs
    )


def refused(response: httpx.Response, status: int = 400, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def thin_png(width: int, height: int) -> bytes:
    """A real, decodable 8-bit grey PNG of ``width`` x ``height`` black pixels (tiny when compressed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress((b"\0" * (width + 1)) * height, 9)  # a filter byte, then the row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class Stream:
    """A long streamed completion in a thread: records its text pieces and their arrival times."""

    def __init__(self, url: str, max_tokens: int = 200) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.times: list[float] = []
        self.finish: str | None = None
        self.tokens = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self.thread.start()
        assert wait_until(lambda: len(self.times) > 2, TIMEOUT), "the stream did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(TIMEOUT)

    def _run(self) -> None:
        body = _request(max_tokens=self.max_tokens, stream=True, ignore_eos=True, temperature=0)
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.times.append(time.monotonic())
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        self.finish = chunk["choices"][0]["finish_reason"] or self.finish
                    if chunk.get("usage"):
                        self.tokens = chunk["usage"]["completion_tokens"]

    def assert_unharmed(self, max_gap_s: float = 5.0) -> None:
        assert not self.thread.is_alive() and self.finish == "length"
        assert self.tokens == self.max_tokens
        gap = max(b - a for a, b in zip(self.times, self.times[1:], strict=False))
        assert gap < max_gap_s, f"the stream stalled for {gap:.1f} s"


# ---- images ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (1, 300), (3, 40_000)])
def test_thin_images_get_normal_answers(live, size):
    png = _png(*size, mode="1")
    assert len(png) < 200  # the attack: a ~100-byte PNG
    reply = post(live.url, _request(messages=image_message(data_uri(png))))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_side_beyond_65535_pixels_is_refused_before_decoding(live):
    png = thin_png(1, 40_000_000)  # 40 Mpx: within the pixel limit, absurd in shape
    start = time.monotonic()
    error = refused(
        post(live.url, _request(messages=image_message(data_uri(png)))), 413, code="image_too_large"
    )
    assert "1x40000000" in error["message"] and error["param"] == "messages[0].content[0].image_url"
    assert time.monotonic() - start < 5


def test_images_per_request_are_bounded(live):
    uri = data_uri(_png(8, 8))
    parts = [{"type": "image_url", "image_url": {"url": uri}}] * 9 + [{"type": "text", "text": "?"}]
    error = refused(
        post(live.url, _request(messages=[{"role": "user", "content": parts}])), code="too_many_images"
    )
    assert "9 images" in error["message"] and error["param"] == "messages"


def test_image_bytes_per_request_are_bounded(live, cat_png):
    state = live.server.config.app.state.server
    policy = state.policy
    state.policy = replace(policy, max_image_bytes=len(cat_png) + 100)
    try:
        parts = [{"type": "image_url", "image_url": {"url": data_uri(cat_png)}}] * 2
        error = refused(post(live.url, _request(messages=[{"role": "user", "content": parts}])), 413)
        assert error["code"] == "image_too_large" and error["param"] == "messages"
        assert post(live.url, _request(messages=image_message(data_uri(cat_png)))).status_code == 200
    finally:
        state.policy = policy


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@contextmanager
def server_process(folder: Path, log: Path):
    """``fastvlm serve`` in a process of its own, so its peak memory and its log can be read."""
    import fastvlm

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(fastvlm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastvlm.server.cli", "--model", str(folder), "--port", str(port)]
    command += ["--device", "cpu", "--dtype", "float32", "--max-batch", "2", "--served-model-name", MODEL]
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 120), "the server process did not start"
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_memory_stays_bounded(tiny_checkpoint_dir, cat_png, tmp_path):
    """Peak RSS of the server process (VmHWM) grows by little for each attack."""
    log = tmp_path / "serve.log"
    with server_process(tiny_checkpoint_dir, log) as (url, pid):
        # Warm up with an ordinary photo, so the baseline includes the vision tower's work.
        assert post(url, _request(messages=image_message(data_uri(cat_png)))).status_code == 200
        base = _peak_rss_mb(pid)
        for size in [(1, 5000), (5000, 1), (1, 300)]:
            assert (
                post(url, _request(messages=image_message(data_uri(_png(*size, mode="1"))))).status_code
                == 200
            )
        images = _peak_rss_mb(pid) - base
        assert (
            post(url, _request(messages=image_message(data_uri(thin_png(1, 40_000_000))))).status_code == 413
        )
        start = time.monotonic()
        text = post(url, _request(messages=[{"role": "user", "content": "x" * 16_000_000}]))
        refused(text, param="messages", code="context_length_exceeded")
        text_s = time.monotonic() - start
        total = _peak_rss_mb(pid) - base
        headers = {"content-type": "application/json", "x-request-id": "trace-9"}
        assert post(url, _request(max_tokens=1), headers=headers).status_code == 200
    # uvicorn's access line carries the request id too.
    assert any(
        "[trace-9]" in line and "POST /v1/chat/completions" in line for line in log.read_text().splitlines()
    )
    print(
        f"\npeak RSS growth: thin images {images:.0f} MB, all attacks {total:.0f} MB; prompt {text_s:.2f} s"
    )
    assert images < 150 and total < 400 and text_s < 10


@pytest.fixture(scope="module")
def cat_png() -> bytes:
    return (builders.shared_assets() / "images" / "000000039769.png").read_bytes()


class _Redirect(BaseHTTPRequestHandler):
    location = ""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(302)
        self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("location", ["data:image/png;base64,AAAA", "mailto:someone@example.com", "//"])
def test_redirect_to_an_unusable_url_is_a_400(tiny, location):
    model, processor = tiny
    _Redirect.location = location
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        with serve(model, processor, allow_remote_images=True, allow_private_image_hosts=True) as server:
            url = f"http://127.0.0.1:{host.server_address[1]}/cat.png"
            error = refused(post(server.url, _request(messages=image_message(url))))
            assert error["param"] == "messages[0].content[0].image_url"
            assert error["code"] in ("invalid_image", "image_url_forbidden")
            assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        host.shutdown()
        host.server_close()


# ---- sampling parameters, types, fields -------------------------------------------------


TINY_PENALTY = {"temperature": 0.1, "seed": 1, "ignore_eos": True, "stream": True, "max_tokens": 200}


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({**TINY_PENALTY, "repetition_penalty": 1e-38}, "repetition_penalty"),
        ({**TINY_PENALTY, "repetition_penalty": 1e-320}, "repetition_penalty"),
        ({"repetition_penalty": 1e6}, "repetition_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"temperature": 1e308 * 10}, "temperature"),  # json.dumps writes Infinity
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": "4"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"max_completion_tokens": "4"}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"ignore_eos": "true"}, "ignore_eos"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"n": "1"}, "n"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": "yes"}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {"10": 101}}, "logit_bias.10"),
        ({"logit_bias": {"10": "1"}}, "logit_bias.10"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),  # past the vocabulary
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1]"}, "guided_json"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", ""]}, "guided_choice"),
        ({"guided_choice": ["a"], "guided_regex": "a+"}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json"),
        ({"stop": 5}, "stop"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_bad_sampling_values_and_loose_types_are_refused(live, overrides, param):
    refused(post(live.url, _request(**overrides)), 400, param=param)


def test_numbers_keep_their_json_spelling(live):
    # An integer where the API says "number" is fine; so are the bounds themselves.
    body = _request(temperature=1, top_p=1, repetition_penalty=10, seed=2**63 - 1, min_p=0, max_tokens=2)
    assert post(live.url, body).status_code == 200


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("guided_grammar", "root ::= 'a'"),
        ("guided_whitespace_pattern", " "),
        ("structured_outputs", {"regex": "a+"}),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(live, field, value):
    error = refused(post(live.url, _request(**{field: value})), 400, param=field)
    assert error["code"] == "unsupported_parameter" or field in error["message"]


def test_harmless_fields_are_accepted(live):
    harmless = {
        "user": "u-1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tool_choice": "auto",
        "function_call": "none",
        "tools": [],
        "modalities": ["text"],
        "logprobs": False,
        "top_logprobs": 0,
        "n": 1,
        "guided_decoding_backend": "auto",
        "some_future_field": {"x": 1},
    }
    assert post(live.url, _request(**harmless)).status_code == 200


# ---- text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "user", "content": "hi \ud800 there"}], "messages[0].content"),
        (
            [
                {"role": "system", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "\udfff"}]},
            ],
            "messages[1].content[0].text",
        ),
    ],
)
def test_lone_surrogates_are_named(live, messages, param):
    error = refused(post(live.url, _request(messages=messages)), 400, param=param)
    assert "surrogate" in error["message"]


def test_lone_surrogate_in_stop(live):
    refused(post(live.url, _request(stop=["\ud800"])), 400, param="stop")


def test_long_stop_strings_and_model_names_are_cut_short(live):
    refused(post(live.url, _request(stop=["x" * 100_000])), 400, param="stop")
    error = refused(post(live.url, _request(model="m" * 1_000_000)), 404, param="model")
    assert len(error["message"]) < 300


@pytest.mark.slow
def test_huge_text_is_refused_before_tokenising_and_streams_carry_on(live):
    with Stream(live.url) as stream:
        start = time.monotonic()
        error = refused(
            post(live.url, _request(messages=[{"role": "user", "content": "x" * 16_000_000}])),
            param="messages",
            code="context_length_exceeded",
        )
        assert "16000000 characters" in error["message"]
        many = [{"role": "user", "content": "x"}] * 200_000
        error = refused(post(live.url, _request(messages=many)), param="messages")
        assert "200000 messages" in error["message"]
        parts = [{"type": "text", "text": "x"}] * 5000
        refused(post(live.url, _request(messages=[{"role": "user", "content": parts}])), param="messages")
        refused(
            post(live.url, _request(**TINY_PENALTY, repetition_penalty=1e-38)), param="repetition_penalty"
        )
        elapsed = time.monotonic() - start
    stream.assert_unharmed()
    assert elapsed < 20


def test_text_within_the_bound_still_reaches_the_exact_check(live):
    # 30,000 characters fit the character bound (16 per token) but not the 4096-token context.
    error = refused(post(live.url, _request(messages=[{"role": "user", "content": "hello " * 5000}])))
    assert error["code"] == "context_length_exceeded" and "token" in error["message"]


# ---- HTTP framing -----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_without_the_json_content_type_is_explained(live, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    error = refused(post(live.url, _request(), headers=headers), 400, code="invalid_content_type")
    assert "Content-Type: application/json" in error["message"]


def test_request_ids(live):
    mine = post(
        live.url,
        _request(max_tokens=1),
        headers={"content-type": "application/json", "x-request-id": "abc-123"},
    )
    assert mine.headers["x-request-id"] == "abc-123"
    for bad in ["has spaces", "x" * 200, "naïve"]:
        headers = {"content-type": "application/json", "x-request-id": bad.encode("utf-8")}
        generated = post(live.url, _request(max_tokens=1), headers=headers)
        assert generated.status_code == 200 and generated.headers["x-request-id"] not in ("", bad)
    ids = {httpx.get(f"{live.url}/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert refused(post(live.url, _request(model="nope")), 404).get("message")
    assert "x-request-id" in httpx.get(f"{live.url}/v1/models/nope").headers
    with httpx.stream(
        "POST", f"{live.url}/v1/chat/completions", json=_request(stream=True), timeout=TIMEOUT
    ) as r:
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32


def test_request_id_reaches_log_lines(live):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("fastvlm.server")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        headers = {"content-type": "application/json", "x-request-id": "trace-42"}
        post(live.url, _request(max_tokens=1), headers=headers)
        assert wait_until(lambda: any(r.request_id == "trace-42" for r in records))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_an_internal_error_is_a_500_with_the_request_id(live, monkeypatch):
    from fastvlm.server import chat

    async def broken(*args):
        raise RuntimeError("a bug")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(RequestIdFilter())
    logging.getLogger("fastvlm.server").addHandler(handler)
    monkeypatch.setattr(chat, "to_generation_request", broken)
    try:
        headers = {"content-type": "application/json", "x-request-id": "bug-7"}
        response = post(live.url, _request(), headers=headers)
    finally:
        logging.getLogger("fastvlm.server").removeHandler(handler)
    error = refused(response, 500, code="internal_error")
    assert "RuntimeError" in error["message"] and response.headers["x-request-id"] == "bug-7"
    assert any(r.request_id == "bug-7" and r.exc_info for r in records)


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    return received


def test_unfinished_heads_and_silent_connections_are_closed(live):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sockets = [_raw(live.url) for _ in range(64)]
    try:
        for i, sock in enumerate(sockets):
            if i % 2:
                sock.sendall(head)  # half the sockets: part of a head; the others: nothing
        assert post(live.url, _request(max_tokens=2)).status_code == 200  # others are served meanwhile
        for sock in sockets:
            _closed_within(sock, HEAD_TIMEOUT_S + 5)
    finally:
        for sock in sockets:
            sock.close()


def test_an_unfinished_body_gets_408(live):
    with _raw(live.url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": '
        )
        start = time.monotonic()
        reply = _closed_within(sock, BODY_TIMEOUT_S + 5)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply
    assert time.monotonic() - start >= BODY_TIMEOUT_S * 0.9


def test_a_chunked_body_that_stalls_gets_408(live):
    with _raw(live.url) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n'
        )
        assert _closed_within(sock, BODY_TIMEOUT_S + 5).startswith(b"HTTP/1.1 408 ")


def test_an_oversized_head_is_refused(live):
    with _raw(live.url) as sock:
        # h11 bounds what it buffers of a head still incomplete (a head that arrives
        # whole in one read is parsed whatever its size).
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 * 1024))
        assert _closed_within(sock, 5).startswith(b"HTTP/1.1 400 ")


def test_idle_keep_alive_connections_are_closed(live):
    with _raw(live.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _closed_within(sock, 5)  # keep_alive_s=1 in this server
    assert reply.startswith(b"HTTP/1.1 200 ")


def test_connection_limit(tiny):
    model, processor = tiny
    limits = ConnectionLimits(head_timeout_s=2.0, max_connections=4)
    with serve(model, processor, limits=limits) as server:
        idle = [_raw(server.url) for _ in range(4)]
        try:
            time.sleep(0.2)
            busy = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
            assert busy.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        assert wait_until(lambda: httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200)


# ---- what held before, kept -------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fcli.py",
     "/static//etc/passwd", "/static/..\\app.py"],
)  # fmt: skip
def test_static_files_do_not_escape_their_folder(live, path):
    response = httpx.get(f"{live.url}{path}")
    assert response.status_code == 404 and "create_app" not in response.text and "root:" not in response.text


def test_every_route_needs_the_key(tiny):
    model, processor = tiny
    with serve(model, processor, api_key="sekret") as server:
        app = server.server.config.app
        open_paths = {"/health", "/", "/static"}
        for route in app.routes:
            path = route.path.replace("{model:path}", "x")
            if path in open_paths:
                continue
            for method in getattr(route, "methods", None) or {"GET"}:
                if method == "HEAD":
                    continue
                response = httpx.request(method, f"{server.url}{path}", timeout=TIMEOUT)
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
