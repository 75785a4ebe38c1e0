"""Prometheus metrics for /metrics: requests, tokens, latencies and engine load, per model/adapter.

/metrics is open (Prometheus scrapes without credentials) unless `--metrics-need-key`. An open
/metrics on a server with an API key must not tell anyone the adapters' names, so there each adapter
is labelled `adapter-<hash>` (the first 10 hex digits of sha256 of its name: stable across restarts,
computable by whoever knows the name).
"""

from __future__ import annotations

import hashlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, engine, *, hide_adapter_names: bool = False):
        disable_created_metrics()  # *_created series double the output and no dashboard reads them
        self.engine = engine
        self.hide_adapter_names = hide_adapter_names
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "llm_serve_requests",
            "Requests by endpoint, model and status code.",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llm_serve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "llm_serve_generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.latency = Histogram(
            "llm_serve_request_latency_seconds", "End-to-end request latency.", ["endpoint", "model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "llm_serve_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("llm_serve_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("llm_serve_running_requests", "Sequences in the running batch.", registry=r)
        self.kv_usage = Gauge(
            "llm_serve_kv_cache_usage_ratio", "Fraction of the KV cache in use.", registry=r
        )
        self.shared_prefix = Gauge(
            "llm_serve_shared_prefix_tokens",
            "Prompt tokens copied from a running sequence's cache instead of computed, since start.",
            registry=r,
        )
        self.prefix_cache = PrefixCacheCollector(r)

    def model_label(self, model) -> str:
        """The `model` label of a served model (`serve.served.ServedModel`)."""
        if model.adapter is None or not self.hide_adapter_names:
            return model.id
        return "adapter-" + hashlib.sha256(model.id.encode()).hexdigest()[:10]

    def render(self) -> bytes:
        stats = self.engine.stats()
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_usage.set(stats.kv_cache_usage)
        self.shared_prefix.set(stats.extra.get("shared_prefix_tokens", 0.0))
        self.prefix_cache.extra = stats.extra
        return generate_latest(self.registry)


# Prefix cache (issue 19): figures an engine reports in `EngineStats.extra` under these keys,
# exported only when it reports them. The cache holds one token per block.
PREFIX_CACHE_METRICS = {
    "prefix_cache_queries": ("counter", "llm_serve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("counter", "llm_serve_prefix_cache_hits", "Prompt tokens served from the prefix cache instead of computed."),
    "prefix_cache_hit_rate": ("gauge", "llm_serve_prefix_cache_hit_rate", "Prefix cache hits / queries, since start."),
    "prefix_cache_tokens": ("gauge", "llm_serve_prefix_cache_blocks", "Blocks (tokens) whose keys/values the prefix cache holds."),
    "prefix_cache_capacity_tokens": ("gauge", "llm_serve_prefix_cache_capacity_blocks", "Blocks (tokens) the prefix cache can hold."),
    "prefix_cache_evicted_tokens": ("counter", "llm_serve_prefix_cache_evictions", "Blocks (tokens) evicted from the prefix cache, least recently used first."),
}  # fmt: skip


class PrefixCacheCollector:
    """Exports the engine's prefix-cache figures as they are at the last `render`."""

    def __init__(self, registry: CollectorRegistry):
        self.extra: dict[str, float] = {}
        registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for key, (kind, name, doc) in PREFIX_CACHE_METRICS.items():
            if key in self.extra:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, doc, value=self.extra[key])
