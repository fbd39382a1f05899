"""The OpenAI-compatible server, end to end: a real uvicorn on a loopback port, the
official ``openai`` client (and raw httpx for malformed input), a tiny random-weight
checkpoint with the real Qwen2 tokenizer.

The direct ``Engine`` is the oracle for what the server must answer; the server's job
is to carry requests and text faithfully, refuse bad input with the right 4xx, and
keep serving.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastapi  # noqa: F401  (the test extra installs the server; a missing one must fail, not skip)
import httpx  # noqa: E402
import openai
import pytest
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

import builders  # noqa: E402
from fastvlm import FastVLM, InputError  # noqa: E402
from fastvlm.generation.engine import Engine, GenerationRequest  # noqa: E402
from fastvlm.processing import FastVLMProcessor, image_fetch  # noqa: E402
from fastvlm.processing.image_source import ImageLoadOptions, ImageSourceError  # noqa: E402
from fastvlm.server.app import create_app  # noqa: E402
from fastvlm.server.serving import ConnectionLimits, uvicorn_config  # noqa: E402

MODEL = "tiny-fastvlm"
TIMEOUT = 60.0
# ---- harness --------------------------------------------------------------------------


def load_tiny(folder: Path):
    model = FastVLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    processor = FastVLMProcessor.from_pretrained(folder, allow_remote_images=False, allow_local_images=False)
    return model, processor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread, stopped (with its engine worker) on exit."""

    def __init__(self, app, limits: ConnectionLimits | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The configuration ``fastvlm serve`` runs, connection limits included.
        config = uvicorn_config(app, host="127.0.0.1", port=self.port, log_level="warning", limits=limits)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0, **kwargs
        )


@contextmanager
def serve(
    model,
    processor,
    *,
    max_batch: int = 8,
    engine: Engine | None = None,
    limits: ConnectionLimits | None = None,
    **app_kwargs,
):
    engine = engine or Engine(model, processor, max_batch=max_batch)
    with LiveServer(create_app(engine, served_model_name=MODEL, **app_kwargs), limits) as live:
        yield live


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=TIMEOUT).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_message(uri: str, text: str = "What is in the image?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}],
        }
    ]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_tiny(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def live(tiny):
    model, processor = tiny
    with serve(model, processor, max_batch=8, max_queue=16) as server:
        yield server


@pytest.fixture(scope="module")
def cat_png() -> bytes:
    return (builders.shared_assets() / "images" / "000000039769.png").read_bytes()


def engine_answer(tiny, messages: list[dict], **kwargs):
    """What the engine itself answers: the oracle for the server."""
    model, processor = tiny
    return Engine(model, processor, max_batch=1).generate([GenerationRequest(messages=messages, **kwargs)])[0]


# ---- answers --------------------------------------------------------------------------


def test_models_health_and_page(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and "chat.js" in page.text
    assert httpx.get(f"{live.url}/static/chat.js").status_code == 200
    assert httpx.get(f"{live.url}/v1/models/nope").status_code == 404


def test_completion_with_image_matches_engine(live, tiny, cat_png):
    reply = live.client().chat.completions.create(
        model=MODEL, messages=image_message(data_uri(cat_png)), max_tokens=12, temperature=0
    )
    expected = engine_answer(
        tiny,
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": cat_png},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
        max_new_tokens=12,
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens > builders.IMAGE_SIZE // 64 * 2
    assert reply.usage.completion_tokens == expected.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_text_only_matches_plain(live):
    client = live.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_and_without_usage_by_default(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"' in events[-2].replace(" ", "") and '"usage"' not in events[-2]


def test_seed_reproducible(live):
    client = live.client()

    def sample(seed: int) -> str:
        messages = [{"role": "user", "content": "Tell me a story."}]
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first  # 152000-way random sampling: a collision is practically impossible


def test_stop_string_and_max_completion_tokens(live):
    client = live.client()
    messages = [{"role": "user", "content": "Count."}]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=16, temperature=0
    )
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_default_budget_fits_the_context(live):
    # No max_tokens: the server's default (512) is cut to what fits after a ~4000-token prompt.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 4000}], "ignore_eos": True}
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert 0 < usage["completion_tokens"] < 512 and usage["total_tokens"] == 4096
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_multi_turn_history(live, cat_png):
    client = live.client()
    first = image_message(data_uri(cat_png))
    answer = client.chat.completions.create(model=MODEL, messages=first, max_tokens=5, temperature=0)
    follow = [*first, {"role": "assistant", "content": answer.choices[0].message.content}]
    follow.append({"role": "user", "content": "And the colour?"})
    second = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=5, temperature=0)
    assert second.usage.prompt_tokens > answer.usage.prompt_tokens + answer.usage.completion_tokens


@pytest.mark.slow
def test_sixteen_concurrent_streams_are_batched(live, cat_png):
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    uri = data_uri(cat_png)

    async def one(i: int) -> tuple[str, str | None]:
        messages = (
            image_message(uri, f"Question {i}?") if i % 2 else [{"role": "user", "content": f"Hello {i}"}]
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0.7, seed=i, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of_them():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), TIMEOUT)
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    assert len(results) == 16 and all(text and reason in ("stop", "length") for text, reason in results)
    seen = metrics(live.url)
    assert seen["fastvlm_peak_batch_size"] > 1
    assert seen["fastvlm_max_batch"] == 8
    assert wait_until(lambda: metrics(live.url)["fastvlm_running_requests"] == 0)
    # The same image in eight requests is encoded once or twice, then served from the cache.
    assert seen["fastvlm_engine_feature_cache_hits_total"] >= 6


# ---- bad input ------------------------------------------------------------------------


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(**overrides) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **overrides}


def _with_image(url: str) -> dict:
    return _request(messages=image_message(url))


BAD_REQUESTS = {
    "not json": (b"{'model': nope", 400, None),
    "no messages": ({"model": MODEL}, 400, None),
    "messages not a list": (_request(messages="hello"), 400, None),
    "empty messages": (_request(messages=[]), 400, None),
    "bad role": (_request(messages=[{"role": "wizard", "content": "hi"}]), 400, None),
    "unknown part type": (_request(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, None),
    "unknown model": (_request(model="gpt-9"), 404, "model_not_found"),
    "n=9": (_request(n=9), 400, None),
    "max_tokens 0": (_request(max_tokens=0), 400, None),
    "max_tokens huge": (_request(max_tokens=10**7), 400, None),
    "max_tokens not int": (_request(max_tokens="lots"), 400, None),
    "prompt + max_tokens over context": (_request(max_tokens=4096), 400, "context_length_exceeded"),
    "prompt over context": (
        _request(messages=[{"role": "user", "content": "hello " * 5000}]),
        400,
        "context_length_exceeded",
    ),
    "temperature < 0": (_request(temperature=-1), 400, None),
    "top_p 0": (_request(top_p=0), 400, None),
    "five stops": (_request(stop=["a", "b", "c", "d", "e"]), 400, None),
    "invalid base64": (_with_image("data:image/png;base64,!!!not-base64!!!"), 400, "invalid_image"),
    "not an image": (_with_image(data_uri(b"plain text, not pixels " * 10)), 400, "invalid_image"),
    "truncated image": (_with_image(data_uri(_png(64, 64)[:60])), 400, None),
    "not a data uri": (_with_image("ftp://example.com/cat.png"), 400, "invalid_image"),
    "text media type": (_with_image(data_uri(_png(8, 8), "text/plain")), 400, "invalid_image"),
    "remote url not allowed": (_with_image("http://127.0.0.1:9/cat.png"), 400, "remote_images_disabled"),
    "too many pixels": (_with_image(data_uri(_png(8000, 6000, "1"))), 413, "image_too_large"),
    "stream with bad input": (_request(stream=True, max_tokens=-5), 400, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_refused(live, name):
    body, status, code = BAD_REQUESTS[name]
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    response = httpx.post(f"{live.url}/v1/chat/completions", timeout=TIMEOUT, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code


def test_image_over_size_limit(live):
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    response = httpx.post(f"{live.url}/v1/chat/completions", json=_with_image(data_uri(big)), timeout=TIMEOUT)
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


def test_openai_client_sees_typed_errors(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x " * 5000}], stream=True
        )
    assert info.value.code == "context_length_exceeded"


def test_still_healthy_after_bad_input(live):
    assert httpx.get(f"{live.url}/health").status_code == 200
    reply = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Still there?"}], max_tokens=3
    )
    assert reply.choices[0].message.content
    seen = metrics(live.url)
    assert seen['fastvlm_http_responses_total{code="400"}'] >= 10
    assert seen['fastvlm_http_responses_total{code="413"}'] >= 1


# ---- leaving early, capacity, keys, remote images -------------------------------------


def _long_stream_body(max_tokens: int = 3000) -> dict:
    # ignore_eos keeps a random model talking until max_tokens.
    return _request(max_tokens=max_tokens, stream=True, ignore_eos=True, temperature=0)


def test_disconnect_mid_stream_frees_the_slot(live):
    before = metrics(live.url).get('fastvlm_requests_total{outcome="cancelled"}', 0)
    with httpx.stream(
        "POST", f"{live.url}/v1/chat/completions", json=_long_stream_body(), timeout=TIMEOUT
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert wait_until(lambda: metrics(live.url)["fastvlm_running_requests"] == 1)
    # Closing the response drops the connection; the worker cancels at its next step.
    assert wait_until(lambda: metrics(live.url)["fastvlm_running_requests"] == 0)
    assert metrics(live.url)['fastvlm_requests_total{outcome="cancelled"}'] == before + 1


def test_disconnect_while_waiting_for_a_plain_answer(live):
    before = metrics(live.url).get('fastvlm_requests_total{outcome="cancelled"}', 0)
    body = _request(max_tokens=3000, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.5))
    assert wait_until(
        lambda: metrics(live.url).get('fastvlm_requests_total{outcome="cancelled"}', 0) == before + 1
    )
    assert wait_until(lambda: metrics(live.url)["fastvlm_running_requests"] == 0)


def test_full_queue_gives_429(tiny):
    model, processor = tiny
    with serve(model, processor, max_batch=1, max_queue=0) as small:
        url = f"{small.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=_long_stream_body(), timeout=TIMEOUT) as r:
            lines = r.iter_lines()  # keep it referenced: closing it would close the connection
            assert next(lines).startswith("data: ")
            refused = httpx.post(url, json=_request(), timeout=TIMEOUT)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
        assert wait_until(lambda: metrics(small.url)["fastvlm_running_requests"] == 0)
        assert httpx.post(url, json=_request(), timeout=TIMEOUT).status_code == 200


def test_engine_failure_fails_the_request_not_the_server(tiny):
    model, processor = tiny
    engine = Engine(model, processor, max_batch=2)
    real_step, failures = engine.step, [RuntimeError("simulated fault")]

    def flaky_step():
        if failures:
            raise failures.pop()
        return real_step()

    engine.step = flaky_step
    with serve(model, processor, engine=engine) as server:
        url = f"{server.url}/v1/chat/completions"
        plain = httpx.post(url, json=_request(), timeout=TIMEOUT)
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_error"
        assert wait_until(lambda: not engine.has_work)  # the failed request is cleaned up
        failures.append(RuntimeError("simulated fault"))
        with httpx.stream("POST", url, json=_request(stream=True), timeout=TIMEOUT) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and '"engine_error"' in events[-2] and events[-1] == "data: [DONE]"
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.post(url, json=_request(), timeout=TIMEOUT).status_code == 200
        assert metrics(server.url)['fastvlm_requests_total{outcome="failed"}'] == 2


class _ImageHost(BaseHTTPRequestHandler):
    image = b""
    hits = 0
    host = ""  # the Host header of the last request

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).hits += 1
        type(self).host = self.headers["Host"]
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args):
        pass


@contextmanager
def image_host(image: bytes):
    _ImageHost.image, _ImageHost.hits = image, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_image_is_never_fetched_when_disallowed(live, cat_png):
    with image_host(cat_png) as url:
        response = httpx.post(f"{live.url}/v1/chat/completions", json=_with_image(url), timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["error"]["code"] == "remote_images_disabled"
        assert _ImageHost.hits == 0


def test_api_key_and_remote_images(tiny, cat_png):
    model, processor = tiny
    with (
        serve(
            model, processor, api_key="sekret", allow_remote_images=True, allow_private_image_hosts=True
        ) as keyed,
        image_host(cat_png) as url,
    ):
        assert httpx.get(f"{keyed.url}/health").status_code == 200
        assert httpx.get(f"{keyed.url}/").status_code == 200
        missing = httpx.get(f"{keyed.url}/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        wrong = httpx.post(
            f"{keyed.url}/v1/chat/completions", json=_request(), headers={"Authorization": "Bearer x"}
        )
        assert wrong.status_code == 401
        assert httpx.get(f"{keyed.url}/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            keyed.client(api_key="wrong").models.list()
        reply = keyed.client(api_key="sekret").chat.completions.create(
            model=MODEL, messages=image_message(url), max_tokens=3
        )
        assert reply.choices[0].message.content and _ImageHost.hits == 1
        assert reply.usage.prompt_tokens > 4


def fake_dns(monkeypatch, names: dict[str, str]) -> None:
    """Answer for made-up names (there is no DNS here); others (IP literals, localhost) resolve as usual."""
    real = image_fetch.resolve_host

    async def resolve(host: str, port: int) -> list:
        if host in names:
            return [ipaddress.ip_address(names[host])]
        return await real(host, port)

    monkeypatch.setattr(image_fetch, "resolve_host", resolve)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1",
     "::ffff:10.0.0.1", "2002:a00:1::", "::7f00:1"],
)  # fmt: skip
def test_private_and_special_addresses_are_not_public(address):
    assert not image_fetch.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_public(address):
    assert image_fetch.is_public_address(ipaddress.ip_address(address))


def test_remote_images_only_from_public_hosts(tiny, cat_png, monkeypatch):
    model, processor = tiny
    fake_dns(monkeypatch, {"images.example": "10.0.0.1"})
    with serve(model, processor, allow_remote_images=True) as server, image_host(cat_png) as url:
        port = url.split(":")[2].split("/")[0]
        refused = {
            url: "image_host_forbidden",  # 127.0.0.1, refused by default
            f"http://localhost:{port}/cat.png": "image_host_forbidden",
            f"http://[::ffff:127.0.0.1]:{port}/cat.png": "image_host_forbidden",
            "http://images.example/cat.png": "image_host_forbidden",  # a name for 10.0.0.1
            "http://user:secret@images.example/cat.png": "image_url_forbidden",
        }
        errors = {}
        for image_url, code in refused.items():
            response = httpx.post(
                f"{server.url}/v1/chat/completions", json=_with_image(image_url), timeout=TIMEOUT
            )
            assert response.status_code == 400, (image_url, response.text)
            errors[image_url] = error = response.json()["error"]
            assert error["code"] == code and "\n" not in error["message"], image_url
            assert error["param"] == "messages[0].content[0].image_url"
        assert errors[url]["message"].startswith(
            "Cannot fetch the image: the host '127.0.0.1' is not a public internet host"
        )
        assert _ImageHost.hits == 0


def _fetch(url: str, client: httpx.AsyncClient, **limits) -> bytes:
    async def run() -> bytes:
        async with client:
            return await image_fetch.fetch_image(url, ImageLoadOptions(**limits), client, "p")

    return asyncio.run(run())


def test_redirects_are_checked_hop_by_hop(monkeypatch, cat_png):
    fake_dns(monkeypatch, {"images.example": "93.184.216.34", "cdn.example": "93.184.216.35"})
    seen: list[tuple[str, str]] = []
    redirects = {
        "/moved": "http://cdn.example/cat.png",
        "/to-loopback": "http://127.0.0.1/admin",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-file": "file:///etc/passwd",
        "/loop": "/loop",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers["host"]))
        if request.url.path in redirects:
            return httpx.Response(302, headers={"Location": redirects[request.url.path]})
        return httpx.Response(200, content=cat_png)

    def fetch(path: str) -> bytes:
        return _fetch(
            f"http://images.example{path}", httpx.AsyncClient(transport=httpx.MockTransport(handler))
        )

    assert fetch("/moved") == cat_png
    # Each hop goes to the address that was checked, under its own name.
    assert seen == [("93.184.216.34", "images.example"), ("93.184.216.35", "cdn.example")]
    for path, code in [
        ("/to-loopback", "image_host_forbidden"),
        ("/to-metadata", "image_host_forbidden"),
        ("/to-file", "image_url_forbidden"),
        ("/loop", "invalid_image"),
    ]:
        seen.clear()
        with pytest.raises(ImageSourceError) as info:
            fetch(path)
        assert info.value.code == code, path
        assert all(host.startswith("93.184.216.") for host, _ in seen)  # never sent to a refused hop
    assert len(seen) == 1 + image_fetch.MAX_REDIRECTS and "redirects more than" in info.value.detail


def test_a_trickling_image_host_hits_one_overall_deadline(monkeypatch, cat_png):
    fake_dns(monkeypatch, {"slow.example": "93.184.216.34"})

    class Trickle(httpx.AsyncByteStream):
        async def __aiter__(self):
            for byte in cat_png:  # each read is quick, the whole never ends in time
                await asyncio.sleep(0.05)
                yield bytes([byte])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Trickle())

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    start = time.perf_counter()
    with pytest.raises(ImageSourceError, match="longer than 0.5 s"):
        _fetch("http://slow.example/cat.png", client, timeout_s=0.5)
    assert time.perf_counter() - start < 3


def test_plain_http_goes_to_the_checked_address(monkeypatch, cat_png):
    # A name the checked resolver maps to the local image host (and there deemed public):
    # reaching it at all shows httpx did not resolve the name again (DNS rebinding).
    fake_dns(monkeypatch, {"images.example": "127.0.0.1"})
    monkeypatch.setattr(image_fetch, "is_public_address", lambda address: True)
    with image_host(cat_png) as url:
        port = url.split(":")[2].split("/")[0]
        assert _fetch(f"http://images.example:{port}/cat.png", httpx.AsyncClient()) == cat_png
        assert _ImageHost.host == f"images.example:{port}"


def test_https_goes_to_the_checked_address_and_verifies_the_name(monkeypatch, cat_png, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=images.example", "-addext", "subjectAltName=DNS:images.example",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    fake_dns(monkeypatch, {"images.example": "127.0.0.1", "other.example": "127.0.0.1"})
    monkeypatch.setattr(image_fetch, "is_public_address", lambda address: True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    _ImageHost.image = cat_png
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        # Reaching 127.0.0.1 at all shows the name was not resolved again; the handshake
        # succeeding shows the certificate was checked against the name, not the address.
        got = _fetch(f"https://images.example:{port}/cat.png", httpx.AsyncClient(verify=trust))
        assert got == cat_png and _ImageHost.host == f"images.example:{port}"
        with pytest.raises(ImageSourceError, match="cannot fetch"):  # a name the certificate lacks
            _fetch(f"https://other.example:{port}/cat.png", httpx.AsyncClient(verify=trust))
    finally:
        server.shutdown()
        server.server_close()


def test_chunked_body_is_capped_too(tiny):
    model, processor = tiny
    with serve(model, processor, max_body_bytes=1 << 20) as server:
        url = f"{server.url}/v1/chat/completions"
        headers = {"content-type": "application/json"}
        body = json.dumps(_request()).encode()
        # A generator body goes out chunked, without Content-Length.
        fine = httpx.post(url, content=iter([body[:10], body[10:]]), headers=headers, timeout=TIMEOUT)
        assert fine.status_code == 200, fine.text
        # Over the cap only with its last chunk, so the client has sent it all when the 413 comes.
        chunks = [b" " * (256 << 10)] * 4 + [b"x"]
        big = httpx.post(url, content=iter(chunks), headers=headers, timeout=TIMEOUT)
        assert big.status_code == 413, big.text
        assert big.json()["error"]["code"] == "request_too_large"
        assert metrics(server.url)['fastvlm_http_responses_total{code="413"}'] == 1
        # A small Content-Length next to Transfer-Encoding: chunked must not hide the size.
        assert b" 413 " in _raw_chunked_post(server.url, chunks, content_length=10).split(b"\r\n")[0]
        assert httpx.get(f"{server.url}/health").status_code == 200


def _raw_chunked_post(base_url: str, chunks: list[bytes], content_length: int) -> bytes:
    """POST a chunked body that also claims a Content-Length (httpx never sends both)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(head + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_cli_builds_the_app(tiny, tiny_checkpoint_dir):
    import argparse

    from fastvlm.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    folder = tiny_checkpoint_dir
    args = parser.parse_args(
        ["--model", str(folder), "--device", "cpu", "--dtype", "float32", "--max-batch", "2"]
    )
    assert (args.host, args.port, args.allow_remote_images, args.max_queue) == ("127.0.0.1", 8000, False, 64)
    assert not args.allow_private_image_hosts
    app = cli.build_app(args)
    assert not app.state.server.policy.images.allow_private_hosts
    flags = parser.parse_args(["--allow-remote-images", "--allow-private-image-hosts"])
    assert flags.allow_remote_images and flags.allow_private_image_hosts
    assert app.state.server.policy.served_model_name == folder.name
    assert app.state.server.worker.capacity == 2 + 64
    with pytest.raises(InputError, match="--max-queue"):
        cli.check_arguments(parser.parse_args(["--max-queue", "-1"]))
