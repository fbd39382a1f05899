"""What the load benchmarks share: reading an OpenAI-style event stream, and percentiles."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx


async def stream_events(client: httpx.AsyncClient, url: str, body: dict) -> AsyncIterator[dict]:
    """POST ``body`` to ``url``'s chat completions with streaming and yield each event's data."""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def has_content(data: dict) -> bool:
    return bool(data.get("choices") and data["choices"][0]["delta"].get("content"))


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
