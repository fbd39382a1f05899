"""OpenAI response bodies: ``chat.completion``, ``chat.completion.chunk`` and SSE framing.

A request with ``n`` choices answers with one choice per engine result (by ``index``);
its usage counts the prompt once and every choice's completion tokens. Log-probabilities
take OpenAI's shape, ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

DONE = b"data: [DONE]\n\n"
# What a token the sampler could never pick (a grammar mask's -inf) reports, as OpenAI
# and vLLM do: JSON has no infinity, and clients parse this as "never".
FLOOR_LOGPROB = -9999.0


@dataclass
class Completion:
    """What every body of one response shares."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, results: list) -> dict:
        """The whole answer: one choice per result (one per ``n``), in index order."""
        choices = [_choice(r) for r in sorted(results, key=lambda r: r.index)]
        return self._envelope("chat.completion", choices, usage=usage(results))

    def chunk(
        self,
        delta: dict,
        reason: str | None = None,
        *,
        index: int = 0,
        logprobs: list | None = None,
        with_usage: bool = False,
    ) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs_body(logprobs)}
        choice["finish_reason"] = reason
        # As OpenAI does: with usage asked for, every chunk says null until the last one.
        extra = {"usage": None} if with_usage else {}
        return self._envelope("chat.completion.chunk", [choice], **extra)

    def usage_chunk(self, results: list) -> dict:
        return self._envelope("chat.completion.chunk", [], usage=usage(results))

    def _envelope(self, kind: str, choices: list[dict], **fields) -> dict:
        """The keys every body of this response carries, around ``choices`` and ``fields``."""
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **fields, "system_fingerprint": None}


def _choice(result) -> dict:
    return {
        "index": result.index,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": logprobs_body(result.logprobs),
        "finish_reason": finish_reason(result.finish_reason),
    }


def usage(results: list) -> dict:
    """The prompt once (the choices share it), every choice's completion tokens."""
    prompt = results[0].usage.prompt_tokens
    completion = sum(r.usage.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_body(entries: list | None) -> dict | None:
    """Engine ``TokenLogprob``s -> OpenAI's ``logprobs`` object; None when not asked for."""
    if entries is None:
        return None
    content = [{**_token(e), "top_logprobs": [_token(t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def _token(entry) -> dict:
    logprob = entry.logprob if math.isfinite(entry.logprob) else FLOOR_LOGPROB
    return {"token": entry.token, "logprob": max(logprob, FLOOR_LOGPROB), "bytes": list(entry.bytes)}


def finish_reason(reason: str) -> str:
    # "cancelled" only reaches a client that already left; OpenAI knows stop and length.
    return reason if reason in ("stop", "length") else "stop"


def sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
