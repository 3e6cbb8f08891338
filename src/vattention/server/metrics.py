"""Prometheus metrics at GET /metrics, on a registry of the app's own (two servers in one process
do not share counters).

  per request (recorded by the HTTP handler when a request ends):
    vattention:request_success_total{finished_reason}   one per sample: stop, length, abort
    vattention:prompt_tokens_total, vattention:generation_tokens_total
    vattention:time_to_first_token_seconds, vattention:time_per_output_token_seconds,
    vattention:e2e_request_latency_seconds,
    vattention:request_{queue,prefill,decode,inference}_time_seconds     histograms, as vLLM's
      (queue: arrival to admission; prefill: admission to first token; decode: first token to
      the end; inference: admission to the end)
  engine state (read at scrape time from the engine thread's latest engine.stats(); absent
  until the engine has loaded, and once it has failed):
    vattention:num_requests_running, vattention:num_requests_waiting      sequences
    vattention:kv_cache_bytes{state="used"|"committed"|"capacity"}        committed = mapped pages
    vattention:kv_cache_pages{state="total"|"mapped"|"free"}, kv_cache_page_bytes   pages (blocks)
    vattention:kv_cache_usage_ratio                                       used / capacity
    vattention:kv_<counter>_total        the KV design's counters (vattention: pages mapped in
                                         the background / on the critical path, unmapped, ...)
    vattention:num_preemptions_total, vattention:prefix_cache_{queries,hits}_total

  the same under vLLM's names, labelled model_name as vLLM's are, so a vLLM dashboard reads them:
    vllm:request_success_total, vllm:prompt_tokens_total, vllm:generation_tokens_total,
    vllm:time_to_first_token_seconds, vllm:time_per_output_token_seconds,
    vllm:e2e_request_latency_seconds, vllm:request_{queue,prefill,decode,inference}_time_seconds,
    vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc (0..1, KV
    bytes used over the budget), vllm:num_preemptions_total, vllm:prefix_cache_{queries,hits}_total
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .async_engine import ServingStats

PREFIX = "vattention:"
VLLM_PREFIX = "vllm:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0)


class _RequestMetrics:
    """The per-request families under one prefix (and vLLM's model_name label, if given)."""

    def __init__(self, prefix: str, registry: CollectorRegistry, model_name: str | None):
        labels = ["model_name"] if model_name is not None else []
        self._labels = {"model_name": model_name} if model_name is not None else {}

        def counter(name, doc, extra=()):
            return Counter(prefix + name, doc, labels + list(extra), registry=registry)

        def histogram(name, doc, buckets):
            return Histogram(prefix + name, doc, labels, buckets=buckets, registry=registry)
        self.requests = counter("request_success", "Finished samples by finish reason", ["finished_reason"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.ttft = histogram("time_to_first_token_seconds", "Time from the request's arrival to its first token",
                              TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Mean time per output token after the first, per request", TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from the request's arrival to its end",
                             E2E_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to admission", E2E_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Time from admission to the first token",
                                 E2E_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Time from the first token to the end",
                                E2E_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "Time from admission to the end",
                                   E2E_BUCKETS)

    def of(self, metric, **labels):
        labels = {**self._labels, **labels}
        return metric.labels(**labels) if labels else metric


class ServerMetrics:
    def __init__(self, stats: Callable[[], ServingStats], model_name: str = "model"):
        self.registry = CollectorRegistry()
        self._families = [_RequestMetrics(PREFIX, self.registry, None),
                          _RequestMetrics(VLLM_PREFIX, self.registry, model_name)]
        self.registry.register(_EngineCollector(stats, model_name))

    def record(self, finish_reasons: list[str], num_prompt_tokens: int, num_output_tokens: int,
               arrival: float, first_token: float | None, end: float, scheduled: float | None = None) -> None:
        """One request ended (times from time.monotonic(); `scheduled`: when the engine admitted
        it); num_output_tokens over all samples."""
        for m in self._families:
            for reason in finish_reasons:
                m.of(m.requests, finished_reason=reason).inc()
            m.of(m.prompt_tokens).inc(num_prompt_tokens)
            m.of(m.generation_tokens).inc(num_output_tokens)
            m.of(m.e2e).observe(end - arrival)
            if scheduled is not None:
                m.of(m.queue).observe(max(0.0, scheduled - arrival))
                m.of(m.inference).observe(end - scheduled)
            if first_token is not None:
                m.of(m.ttft).observe(first_token - arrival)
                m.of(m.decode).observe(end - first_token)
                if scheduled is not None:
                    m.of(m.prefill).observe(max(0.0, first_token - scheduled))
                samples = max(1, len(finish_reasons))
                if num_output_tokens > samples:
                    m.of(m.tpot).observe((end - first_token) / (num_output_tokens / samples - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's latest published state at each scrape."""

    def __init__(self, stats: Callable[[], ServingStats], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.stats().engine
        if stats is None:
            return
        yield from self._vllm(stats)
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Sequences preempted (KV dropped, recomputed)",
                                  value=stats.num_preemptions)
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

    def _vllm(self, stats) -> Iterator[Metric]:
        """The engine state under vLLM's names and model_name label."""
        def one(kind, name, doc, value):
            family = kind(VLLM_PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family
        kv = stats.kv
        yield one(GaugeMetricFamily, "num_requests_running", "Sequences in the running batch", stats.num_running)
        yield one(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting for admission", stats.num_waiting)
        yield one(GaugeMetricFamily, "kv_cache_usage_perc", "KV cache usage, 1 = full (bytes used / budget)",
                  kv.bytes_used / kv.bytes_capacity if kv.bytes_capacity else 0.0)
        yield one(CounterMetricFamily, "num_preemptions", "Sequences preempted", stats.num_preemptions)
        yield one(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                  stats.prefix_cache_queries)
        yield one(CounterMetricFamily, "prefix_cache_hits", "Of those, tokens found cached", stats.prefix_cache_hits)
