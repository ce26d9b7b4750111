"""Prometheus metrics of the HTTP server, under SGLang's metric names (`sglang:*`).

Latencies are measured here, around the stream the client sees: time to first token
from request arrival to the first chunk with a token, inter-token latency between
consecutive chunks divided by the tokens each chunk carries. The running / queued gauges
are read from `engine.stats()` at scrape time, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


_ENGINE_GAUGES = {
    "kv_pages_free": "Free pages of the in-memory KV pool",
    "kv_pages_total": "Pages of the in-memory KV pool",
    "radix_cache_pages": "Pages held by the in-memory prefix cache",
    "preemptions": "Requests preempted for lack of KV pages (total)",
    "store_chunks_written": "Chunks written into the disk tier (total)",
    "store_chunks_loaded": "Chunks served from the disk tier instead of recomputed (total)",
    "store_bytes_loaded": "KV bytes read from the disk tier (total)",
    "store_write_errors": "Failed disk-tier write batches (total)",
    "store_full_errors": "Disk-tier writes refused as StoreFull: all pinned (total)",
    "store_corrupt_blocks": "Disk-tier blocks that failed their checksum (total)",
    "store_chunks": "Chunks in the disk tier (all processes sharing it)",
    "store_bytes": "Bytes charged to chunks in the disk tier",
    "store_capacity": "Capacity of the disk tier in bytes",
    "store_readonly": "1 when this server only reads the disk tier",
    # streaming tier (per tier: GPU chunk cache <- host memory <- LMDB)
    "chunk_cache_hits": "Streamed chunk-layer blocks found in the GPU chunk cache (total)",
    "chunk_cache_misses": "Streamed chunk-layer blocks fetched into the chunk cache (total)",
    "chunk_cache_evictions": "Chunk-cache entries evicted (total)",
    "chunk_cache_pages": "KV pool pages set aside as the chunk cache",
    "host_cache_hits": "Chunk-cache misses served by the host tier (total)",
    "host_cache_misses": "Chunk-cache misses the host tier did not hold (total)",
    "host_cache_evictions": "Host-tier entries evicted (total)",
    "host_cache_bytes": "Bytes held by the host tier",
    "host_cache_capacity": "Capacity of the host tier in bytes",
    "stream_store_reads": "Chunk-layer blocks read from the disk tier on demand (total)",
    "stream_prefetch_reads": "Chunk-layer blocks read ahead from the disk tier (total)",
    "stream_device_prefetches": "Chunk-layer blocks copied into the chunk cache ahead of "
                                "the step that reads them (total)",
    "stream_prefetch_hits": "Blocks copied ahead that the next step read (total)",
    "stream_store_bytes": "KV bytes the streaming tier read from the disk tier (total)",
    "stream_device_bytes": "KV bytes copied into the chunk cache (total)",
    "stream_summaries_loaded": "Chunk summaries loaded for streamed contexts (total)",
    "stream_summaries_reused": "Streamed chunk summaries found already loaded (total)",
    "stream_attached_chunks": "Chunks of running streamed contexts (summaries resident)",
    "stream_faults": "Streamed chunks that could not be read: corrupt or evicted (total)",
    "stream_spilled_chunks": "Chunks of long prefills moved from the pool to the store "
                             "(total)",
}


class ServerMetrics:
    """One registry per app, so several servers in one process (tests) do not collide."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self._stats = stats
        labels = ["model_name"]
        r = self.registry
        self._requests = Counter("sglang:num_requests", "Requests finished, by route and "
                                 "finish reason", labels + ["route", "finish_reason"],
                                 registry=r)
        self._http_errors = Counter("sglang:num_http_errors", "Requests answered with an "
                                    "HTTP error", labels + ["status"], registry=r)
        self._prompt = Counter("sglang:prompt_tokens", "Prompt tokens", labels, registry=r)
        self._generation = Counter("sglang:generation_tokens", "Generated tokens", labels,
                                   registry=r)
        self._cached = Counter("sglang:cached_tokens", "Prompt tokens served from the "
                               "prefix cache", labels, registry=r)
        self._ttft = Histogram("sglang:time_to_first_token_seconds", "Time to first token "
                               "(streaming requests)", labels, buckets=_LATENCY_BUCKETS,
                               registry=r)
        self._itl = Histogram("sglang:inter_token_latency_seconds", "Inter-token latency "
                              "(streaming requests)", labels, buckets=_ITL_BUCKETS, registry=r)
        self._e2e = Histogram("sglang:e2e_request_latency_seconds", "End-to-end request "
                              "latency", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self._running = Gauge("sglang:num_running_reqs", "Requests being decoded", labels,
                              registry=r)
        self._queued = Gauge("sglang:num_queue_reqs", "Requests waiting to be scheduled",
                             labels, registry=r)
        self._inflight = Gauge("sglang:num_inflight_http_requests", "Generation requests "
                               "open in the HTTP server", labels, registry=r)
        # Engine-side gauges, read from engine.stats() at scrape time: KV pool, radix
        # cache and disk tier (chunks and bytes moved, errors).
        self._engine_gauges = {
            key: Gauge(f"sglang_reattn:{key}", help_text, labels, registry=r)
            for key, help_text in _ENGINE_GAUGES.items()
        }
        self._model = model_name

    def request_opened(self) -> None:
        self._inflight.labels(self._model).inc()

    def request_closed(self) -> None:
        self._inflight.labels(self._model).dec()

    def http_error(self, status: int) -> None:
        self._http_errors.labels(self._model, str(status)).inc()

    def finished(self, route: str, meta: dict[str, Any], started: float,
                 count_prompt: bool = True) -> None:
        """Account one finished output (one per sample of a batch or of n>1)."""
        m = self._model
        reason = (meta.get("finish_reason") or {}).get("type", "unknown")
        self._requests.labels(m, route, reason).inc()
        if count_prompt:
            self._prompt.labels(m).inc(int(meta.get("prompt_tokens") or 0))
            self._cached.labels(m).inc(int(meta.get("cached_tokens") or 0))
        self._generation.labels(m).inc(int(meta.get("completion_tokens") or 0))
        self._e2e.labels(m).observe(time.perf_counter() - started)

    def stream_timer(self, started: float) -> StreamTimer:
        return StreamTimer(self, started)

    def render(self) -> bytes:
        try:
            stats = self._stats()
        except Exception:  # a dead engine must not break /metrics
            stats = {}
        self._running.labels(self._model).set(stats.get("num_running_reqs", 0))
        self._queued.labels(self._model).set(stats.get("num_waiting_reqs", 0))
        for key, gauge in self._engine_gauges.items():
            if key in stats:
                gauge.labels(self._model).set(stats[key])
        return generate_latest(self.registry)


class StreamTimer:
    """TTFT and ITL of one streamed output, fed with its cumulative completion_tokens."""

    def __init__(self, metrics: ServerMetrics, started: float) -> None:
        self._m = metrics
        self._started = started
        self._last_time: float | None = None
        self._last_tokens = 0

    def chunk(self, completion_tokens: int) -> None:
        now = time.perf_counter()
        new = completion_tokens - self._last_tokens
        if new <= 0:
            return
        model = self._m._model
        if self._last_time is None:
            self._m._ttft.labels(model).observe(now - self._started)
            new -= 1  # the first token's latency is the TTFT, not an ITL
        if new > 0 and self._last_time is not None:
            per_token = (now - self._last_time) / new
            for _ in range(new):
                self._m._itl.labels(model).observe(per_token)
        self._last_time = now
        self._last_tokens = completion_tokens
