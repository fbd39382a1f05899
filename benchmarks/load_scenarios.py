"""Two focused server scenarios for ``load_test.py --scenario``.

``stall``: how long a running text stream stalls while image requests arrive. One
streamed text request decodes; once it streams, ``--arrivals`` requests with one
distinct 1024x768 JPEG each (``max_tokens`` 1) arrive together. The gaps between the
text stream's chunks while they are in flight give p50 / p99 / max. Everything the
engine thread does for an arriving image (preparing it, if it does that, the vision
tower, the prefill) shows up as a gap; ``--tiny`` shrinks the model so that the
vision tower and the prefill cost milliseconds and what is left is the preparation.

``queue-memory``: peak resident memory of the server while requests wait. ``--slots``
long text streams take every batch row, then ``--arrivals`` requests of
``--images-per-request`` 1x1 PNGs each are queued behind them; the server's peak
resident set (VmHWM) is read once the queue has stopped growing in memory.
"""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import time
from pathlib import Path

import httpx
from sse_client import has_content, percentile, stream_events


def _png_1x1(index: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (index % 256, (index * 7) % 256, 3)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(model: str, content, max_tokens: int, stream: bool) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def _image_content(uris: list[str], text: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return [*parts, {"type": "text", "text": text}]


async def _stream_chunks(client: httpx.AsyncClient, url: str, body: dict, stamps: list[float], started):
    """Stream ``body``, appending the arrival time of every content chunk to ``stamps``."""
    async for data in stream_events(client, url, body):
        if has_content(data):
            stamps.append(time.perf_counter())
            if not started.is_set() and len(stamps) >= 5:
                started.set()


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> int:
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    return response.status_code


async def stall(args, url: str, image_uri) -> dict:
    """p50 / p99 / max gap of a running text stream while image requests arrive."""
    text = _body(args.model, "Count slowly.", args.stream_tokens, stream=True)
    stamps: list[float] = []
    started = asyncio.Event()
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        streamer = asyncio.create_task(_stream_chunks(client, url, text, stamps, started))
        await started.wait()
        bodies = [
            _body(args.model, _image_content([image_uri(7000 + i)], "Describe it."), 1, stream=False)
            for i in range(args.arrivals)
        ]
        begin = time.perf_counter()
        codes = await asyncio.gather(*(_post(client, url, b) for b in bodies))
        end = time.perf_counter()
        await asyncio.sleep(0.5)  # the gap that spans the last arrival's end
        if streamer.done():
            streamer.result()  # re-raise a failure
            raise SystemExit("the text stream ended before the image requests did; raise --stream-tokens")
        streamer.cancel()
        try:
            await streamer
        except asyncio.CancelledError:
            pass
    window = [t for t in stamps if begin <= t <= end + 0.5]
    gaps = sorted(b - a for a, b in zip(window, window[1:], strict=False))
    before = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b < begin]
    return {
        "scenario": "stall",
        "arrivals": args.arrivals,
        "statuses": sorted(set(codes)),
        "arrivals_wall_s": round(end - begin, 3),
        "gaps_measured": len(gaps),
        "gap_quiet_p50_ms": round(1000 * statistics.median(before), 2) if before else None,
        "gap_p50_ms": round(1000 * percentile(gaps, 50), 2),
        "gap_p99_ms": round(1000 * percentile(gaps, 99), 2),
        "gap_max_ms": round(1000 * max(gaps), 2) if gaps else None,
    }


def _vm(pid: int, key: str) -> int:
    """``key`` (VmHWM, VmRSS) of process ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for pid {pid}")


async def queue_memory(args, url: str, pid: int) -> dict:
    """Peak RSS of the server with every slot busy and ``arrivals`` image requests queued."""
    baseline = _vm(pid, "VmRSS")
    limits = httpx.Limits(max_connections=args.arrivals + args.slots + 4)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        blockers = [
            asyncio.create_task(_post(client, url, _body(args.model, f"Block {i}.", 3000, stream=False)))
            for i in range(args.slots)
        ]
        await asyncio.sleep(1.0)
        uris = [_png_1x1(j) for j in range(args.images_per_request)]
        bodies = [
            _body(args.model, _image_content(uris, f"Q{i}."), 1, stream=False) for i in range(args.arrivals)
        ]
        queued = [asyncio.create_task(_post(client, url, b)) for b in bodies]
        peak, still, deadline = 0, 0, time.monotonic() + args.timeout
        while still < 6 and time.monotonic() < deadline:  # 3 s without growth
            await asyncio.sleep(0.5)
            now = _vm(pid, "VmHWM")
            still = still + 1 if now <= peak else 0
            peak = max(peak, now)
        for task in [*blockers, *queued]:
            task.cancel()
        codes = await asyncio.gather(*queued, return_exceptions=True)
    refused = sum(1 for c in codes if isinstance(c, int) and c == 400)
    return {
        "scenario": "queue-memory",
        "arrivals": args.arrivals,
        "images_per_request": args.images_per_request,
        "refused_400": refused,
        "rss_before_mb": round(baseline / 2**20),
        "peak_rss_mb": round(peak / 2**20),
    }
