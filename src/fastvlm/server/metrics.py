"""Server counters and gauges, rendered in the Prometheus text format for ``/metrics``.

The worker thread writes, the event loop reads, so everything sits behind one lock.
Time to first token is what a client waits: queueing plus image encoding plus prefill.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge}"}} {n}' for edge, n in zip(self.buckets, self.counts, strict=True)]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class Metrics:
    def __init__(self, max_batch: int = 0) -> None:
        self._lock = threading.Lock()
        self.max_batch = max_batch
        self.running = 0
        self.active = 0
        self.peak_batch = 0
        self.outcomes: Counter[str] = Counter()  # finished, rejected, cancelled, failed
        self.finish_reasons: Counter[str] = Counter()
        self.http: Counter[int] = Counter()  # responses by status code
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.engine_stats: dict[str, int] = {}
        self.cache: tuple[int, int, int] | None = None  # feature cache: entries, bytes, byte limit
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(TTFT_BUCKETS)
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens generated in a step)
        self._last_generated: int | None = None

    # -- writers ------------------------------------------------------------------------

    def set_active(self, active: int) -> None:
        with self._lock:
            self.active = active

    def set_engine(
        self, *, running: int, active: int, stats: dict, cache: tuple[int, int, int] | None = None
    ) -> None:
        now = time.monotonic()
        with self._lock:
            self.running, self.active, self.cache = running, active, cache
            self.engine_stats = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
            total = int(stats.get("generated_tokens", 0))
            if self._last_generated is not None and total > self._last_generated:
                self._generated.append((now, total - self._last_generated))
            self._last_generated = total
            while self._generated and self._generated[0][0] < now - RATE_WINDOW_S:
                self._generated.popleft()

    def observe_step(self, batch: int) -> None:
        with self._lock:
            self.peak_batch = max(self.peak_batch, batch)

    def request_finished(self, results: list) -> None:
        """One request's results, one per choice: their prompt is counted once."""
        first = min(results, key=lambda r: r.timings.queue_s + r.timings.ttft_s)
        with self._lock:
            self.outcomes["finished"] += 1
            for result in results:
                self.finish_reasons[result.finish_reason] += 1
                self.completion_tokens += result.usage.completion_tokens
            self.prompt_tokens += first.usage.prompt_tokens
            if first.usage.completion_tokens:
                self.ttft.observe(first.timings.queue_s + first.timings.ttft_s)
            self.latency.observe(max(r.timings.total_s for r in results))

    def request_rejected(self) -> None:
        self._count("rejected")

    def request_cancelled(self) -> None:
        self._count("cancelled")

    def request_failed(self) -> None:
        self._count("failed")

    def http_response(self, status: int) -> None:
        with self._lock:
            self.http[status] += 1

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    # -- readers ------------------------------------------------------------------------

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._generated if t >= now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            lines: list[str] = []
            gauge = _family(lines, "gauge")
            counter = _family(lines, "counter")
            gauge(
                "fastvlm_queue_length",
                "Requests accepted and waiting for a batch slot.",
                [("", max(0, self.active - self.running))],
            )
            gauge("fastvlm_running_requests", "Requests in the running batch.", [("", self.running)])
            gauge("fastvlm_max_batch", "Configured batch size limit.", [("", self.max_batch)])
            gauge(
                "fastvlm_peak_batch_size", "Largest batch one decode step has run.", [("", self.peak_batch)]
            )
            gauge(
                "fastvlm_tokens_per_second",
                f"Generated tokens per second over the last {RATE_WINDOW_S:.0f} s.",
                [("", round(rate, 3))],
            )
            counter(
                "fastvlm_requests_total",
                "Requests that reached the engine, by outcome.",
                [(f'{{outcome="{k}"}}', v) for k, v in sorted(self.outcomes.items())],
            )
            counter(
                "fastvlm_finished_requests_total",
                "Finished requests, by finish reason.",
                [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(self.finish_reasons.items())],
            )
            counter(
                "fastvlm_http_responses_total",
                "Responses to /v1 requests, by status code.",
                [(f'{{code="{k}"}}', v) for k, v in sorted(self.http.items())],
            )
            counter(
                "fastvlm_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                [("", self.prompt_tokens)],
            )
            counter(
                "fastvlm_generation_tokens_total",
                "Generated tokens of finished requests.",
                [("", self.completion_tokens)],
            )
            self._cache_lines(gauge)
            for key, value in sorted(self.engine_stats.items()):
                counter(f"fastvlm_engine_{key}_total", f"Engine counter {key}.", [("", value)])
            _histogram(
                lines,
                "fastvlm_time_to_first_token_seconds",
                "Queueing + prefill time to the first token.",
                self.ttft,
            )
            _histogram(
                lines,
                "fastvlm_request_duration_seconds",
                "Time from submission to the last token.",
                self.latency,
            )
        return "\n".join(lines) + "\n"

    def _cache_lines(self, gauge) -> None:
        if self.cache is None:
            return
        entries, nbytes, limit = self.cache
        hits = self.engine_stats.get("feature_cache_hits", 0)
        lookups = hits + self.engine_stats.get("images_encoded", 0)
        gauge("fastvlm_feature_cache_entries", "Image features held for reuse.", [("", entries)])
        gauge("fastvlm_feature_cache_bytes", "Bytes the feature cache holds.", [("", nbytes)])
        gauge("fastvlm_feature_cache_max_bytes", "The feature cache's byte limit.", [("", limit)])
        gauge(
            "fastvlm_feature_cache_hit_rate",
            "Images whose features came from the cache, of all images prefilled.",
            [("", round(hits / lookups, 4) if lookups else 0.0)],
        )


def _family(lines: list[str], kind: str):
    def add(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    return add


def _histogram(lines: list[str], name: str, help_text: str, histogram: Histogram) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    lines.extend(histogram.lines(name))
