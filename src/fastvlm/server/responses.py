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
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = finish_reason(result.finish_reason)
        return self._envelope("chat.completion", [choice], usage=usage(result.usage))

    def chunk(self, delta: dict, reason: str | None = None, *, with_usage: bool = False) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        # As OpenAI does: with usage asked for, every chunk says null until the last one.
        extra = {"usage": None} if with_usage else {}
        return self._envelope("chat.completion.chunk", [choice], **extra)

    def usage_chunk(self, result) -> dict:
        return self._envelope("chat.completion.chunk", [], usage=usage(result.usage))

    def _envelope(self, kind: str, choices: list[dict], **fields) -> dict:
        """The keys every body of this response carries, around ``choices`` and ``fields``."""
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **fields, "system_fingerprint": None}


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
