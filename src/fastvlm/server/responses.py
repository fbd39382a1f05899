"""OpenAI response bodies: ``chat.completion``, ``chat.completion.chunk`` and SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

DONE = b"data: [DONE]\n\n"


@dataclass
class Completion:
    """What every body of one response shares."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, result) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": finish_reason(result.finish_reason),
                }
            ],
            "usage": usage(result.usage),
            "system_fingerprint": None,
        }

    def chunk(self, delta: dict, reason: str | None = None, *, with_usage: bool = False) -> dict:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            "system_fingerprint": None,
        }
        if with_usage:  # as OpenAI does: every chunk says usage null until the last one
            body["usage"] = None
        return body

    def usage_chunk(self, result) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(result.usage),
            "system_fingerprint": None,
        }


def usage(u) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def finish_reason(reason: str) -> str:
    # "cancelled" only reaches a client that already left; OpenAI knows stop and length.
    return reason if reason in ("stop", "length") else "stop"


def sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
