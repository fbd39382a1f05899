"""The FastAPI app: OpenAI-compatible routes around one ``EngineWorker``.

    POST /v1/chat/completions   chat, plain or streamed (SSE)
    GET  /v1/models             the one served model
    GET  /health                200 while the worker thread lives (never needs a key)
    GET  /metrics               Prometheus text
    GET  /                      the chat page (static files, no build step)

The server knows nothing about tensors: it validates requests, turns them into
``GenerationRequest``s and relays the worker's events. Build it with ``create_app``
around an ``Engine``; ``cli.run`` does that for ``fastvlm serve``.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from ..processing.image_source import ImageLoadOptions
from .chat import ServerState, chat_completion
from .errors import APIError, install_error_handlers
from .images import MAX_IMAGES_PER_REQUEST, server_image_options
from .metrics import Metrics
from .middleware import BODY_TIMEOUT_S, Guard
from .schemas import MAX_CHOICES, ChatCompletionRequest
from .translate import Policy
from .worker import EngineWorker

STATIC = Path(__file__).parent / "static"


def create_app(
    engine,
    *,
    served_model_name: str = "fastvlm",
    api_key: str | None = None,
    allow_remote_images: bool = False,
    allow_private_image_hosts: bool = False,
    max_queue: int = 64,
    default_max_tokens: int = 512,
    image_options: ImageLoadOptions | None = None,
    max_images: int | None = None,
    max_body_bytes: int = 64 * 1024 * 1024,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """An app that serves ``engine`` (a ``fastvlm.generation.engine.Engine``).

    The engine's worker thread starts and stops with the app's lifespan. Remote images
    are fetched only with ``allow_remote_images``, and then from private addresses
    (loopback, LAN, link-local, ...) only with ``allow_private_image_hosts`` as well.
    """
    images = replace(
        image_options or server_image_options(),
        allow_remote=allow_remote_images,
        allow_private_hosts=allow_private_image_hosts,
    )
    metrics = Metrics(max_batch=int(getattr(engine, "max_batch", 1)))
    worker = EngineWorker(engine, max_queue=max_queue, metrics=metrics)
    policy = Policy(
        served_model_name,
        int(engine.max_seq_len),
        default_max_tokens,
        images,
        _max_images(engine) if max_images is None else max_images,
        image_tokens=int(getattr(getattr(engine, "processor", None), "num_image_tokens", 0)),
        vocab_size=_vocab_size(engine),
        max_choices=min(MAX_CHOICES, int(getattr(engine, "max_batch", 1))),
        check_constraint=getattr(getattr(engine, "grammars", None), "compile", None),
    )
    state = ServerState(worker, policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        state.http = httpx.AsyncClient() if allow_remote_images else None
        try:
            yield
        finally:
            worker.stop()
            if state.http is not None:
                await state.http.aclose()

    app = FastAPI(title="fastvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(
        Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s, metrics=metrics
    )
    started = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await chat_completion(request, body, state)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(served_model_name, started)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != served_model_name:
            raise APIError(
                404, f"The model {model[:100]!r} does not exist.", param="model", code="model_not_found"
            )
        return _model_card(served_model_name, started)

    @app.get("/health")
    async def health() -> Response:
        if not worker.alive:
            return JSONResponse({"status": "error", "detail": "engine worker stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _max_images(engine) -> int:
    """The engine's own limit, so that the server refuses exactly what the engine would."""
    limits = getattr(engine, "limits", None)
    return int(getattr(limits, "max_images", MAX_IMAGES_PER_REQUEST))


def _vocab_size(engine) -> int:
    """The logits' width: the token ids a logit_bias may name (0 when unknown)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    return int(getattr(getattr(config, "text", None), "vocab_size", 0) or 0)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "fastvlm"}
