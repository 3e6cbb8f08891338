"""Prometheus metrics at GET /metrics, on a registry of the app's own (two servers in one process
do not share counters).

  per request (recorded by the HTTP handler when a request ends):
    vattention:request_success_total{finished_reason}   one per sample: stop, length, abort
    vattention:prompt_tokens_total, vattention:generation_tokens_total
    vattention:time_to_first_token_seconds, vattention:time_per_output_token_seconds,
    vattention:e2e_request_latency_seconds                               histograms, as vLLM's
  engine state (read at scrape time from the engine thread's latest engine.stats(); absent
  until the engine has loaded, and once it has failed):
    vattention:num_requests_running, vattention:num_requests_waiting      sequences
    vattention:kv_cache_bytes{state="used"|"committed"|"capacity"}        committed = mapped pages
    vattention:kv_cache_pages{state="total"|"mapped"|"free"}, kv_cache_page_bytes   pages (blocks)
    vattention:kv_cache_usage_ratio                                       used / capacity
    vattention:kv_<counter>_total        the KV design's counters (vattention: pages mapped in
                                         the background / on the critical path, unmapped, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .async_engine import ServingStats

PREFIX = "vattention:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], ServingStats]):
        self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "request_success", "Finished samples by finish reason",
                                ["finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated",
                                         registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from the request's arrival to its end",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def record(self, finish_reasons: list[str], num_prompt_tokens: int, num_output_tokens: int,
               arrival: float, first_token: float | None, end: float) -> None:
        """One request ended (times from time.monotonic()); num_output_tokens over all samples."""
        for reason in finish_reasons:
            self.requests.labels(reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            samples = max(1, len(finish_reasons))
            if num_output_tokens > samples:
                self.tpot.observe((end - first_token) / (num_output_tokens / samples - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's latest published state at each scrape."""

    def __init__(self, stats: Callable[[], ServingStats]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats().engine
        if stats is None:
            return
        yield GaugeMetricFamily(PREFIX + "num_requests_running",
                                "Sequences in the running batch", value=stats.num_running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                "Sequences waiting for admission", value=stats.num_waiting)
        kv = stats.kv
        memory = GaugeMetricFamily(
            PREFIX + "kv_cache_bytes", "KV cache bytes: used (holding tokens), committed (mapped "
            "pages, allocated blocks or reservations), capacity (the budget)", labels=["state"])
        memory.add_metric(["used"], kv.bytes_used)
        memory.add_metric(["committed"], kv.bytes_committed)
        memory.add_metric(["capacity"], kv.bytes_capacity)
        yield memory
        pages = GaugeMetricFamily(
            PREFIX + "kv_cache_pages", "KV memory units (vattention: physical pages; paged: blocks; "
            "static: per-request reservations): total, mapped (busy or kept for reuse), free",
            labels=["state"])
        pages.add_metric(["total"], kv.pages_total)
        pages.add_metric(["mapped"], kv.pages_mapped)
        pages.add_metric(["free"], kv.pages_free)
        yield pages
        yield GaugeMetricFamily(PREFIX + "kv_cache_page_bytes", "bytes per KV memory unit",
                                value=kv.page_bytes)
        ratio = kv.bytes_used / kv.bytes_capacity if kv.bytes_capacity else 0.0
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "KV bytes used over the budget",
                                value=ratio)
        # vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens)
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the "
                                  "prefix cache (sequences admitted from scratch)", value=stats.prefix_cache_queries)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Of those, tokens found cached",
                                  value=stats.prefix_cache_hits)
        yield GaugeMetricFamily(PREFIX + "kv_cache_shared_bytes", "KV bytes the running requests "
                                "share (a cached prefix several map), counted once in committed",
                                value=kv.bytes_saved)
        for name, value in kv.counters.items():
            yield CounterMetricFamily(PREFIX + f"kv_{name}", f"KV cache counter {name}",
                                      value=value)
