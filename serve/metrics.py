"""Prometheus metrics for /metrics: requests, tokens, latencies and engine load, per model/adapter.

/metrics is open (Prometheus scrapes without credentials) unless `--metrics-need-key`. An open
/metrics on a server with an API key must not tell anyone the adapters' names, so there each adapter
is labelled `adapter-<hash>` (the first 10 hex digits of sha256 of its name: stable across restarts,
computable by whoever knows the name).

Per-adapter residency figures (requests, tokens, loads into a LoRA slot and their time, resident or
not, resident and known counts) come from the engine's adapter pool at scrape time (`AdapterCollector`),
so the engine thread never touches a Prometheus object.
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

        self.served = None  # set by the app once the engine is up: the known-adapter count
        r.register(AdapterCollector(self))

    def model_label(self, model) -> str:
        """The `model` label of a served model (`serve.served.ServedModel`)."""
        return model.id if model.adapter is None else self.adapter_label(model.id)

    def adapter_label(self, name: str) -> str:
        """The label of an adapter by served name: the name, or its hash on an open /metrics."""
        if not self.hide_adapter_names:
            return name
        return "adapter-" + hashlib.sha256(name.encode()).hexdigest()[:10]

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


class AdapterCollector:
    """`llm_serve_adapter_*` series from `engine.adapter_stats()` (None: the engine has no pool)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from serve.engine.adapter_pool import LOAD_BUCKETS

        adapter_stats = getattr(self.metrics.engine, "adapter_stats", None)  # stand-in engines lack it
        stats = adapter_stats() if adapter_stats is not None else None
        if stats is None:
            return
        label = ["adapter"]
        requests = CounterMetricFamily("llm_serve_adapter_requests", "Requests per adapter.", labels=label)
        prompt = CounterMetricFamily(
            "llm_serve_adapter_prompt_tokens", "Prompt tokens per adapter.", labels=label
        )
        generated = CounterMetricFamily(
            "llm_serve_adapter_generation_tokens", "Generated tokens per adapter.", labels=label
        )
        loads = CounterMetricFamily(
            "llm_serve_adapter_loads", "Times an adapter was loaded into a LoRA slot.", labels=label
        )
        load_time = CounterMetricFamily(
            "llm_serve_adapter_load_seconds",
            "Time spent loading an adapter into a LoRA slot (reading its files when not in host memory, "
            "then copying), summed.",
            labels=label,
        )
        resident = GaugeMetricFamily(
            "llm_serve_adapter_resident", "1 while the adapter holds a LoRA slot.", labels=label
        )
        for name, t in sorted(stats.totals.items()):
            lbl = [self.metrics.adapter_label(name)]
            requests.add_metric(lbl, t.requests)
            prompt.add_metric(lbl, t.prompt_tokens)
            generated.add_metric(lbl, t.generated_tokens)
            loads.add_metric(lbl, t.loads)
            load_time.add_metric(lbl, t.load_seconds)
            resident.add_metric(lbl, 1.0 if stats.resident.get(name) else 0.0)
        yield from (requests, prompt, generated, loads, load_time, resident)
        yield GaugeMetricFamily(
            "llm_serve_adapters_resident", "Adapters holding a LoRA slot.", value=sum(stats.resident.values())
        )
        yield GaugeMetricFamily("llm_serve_lora_slots", "LoRA slots (--max-loras).", value=stats.slots)
        yield GaugeMetricFamily(
            "llm_serve_adapter_copy_seconds_max",
            "Longest pause a load put between two engine steps (copying an adapter into its slot).",
            value=stats.max_copy_seconds,
        )
        served = self.metrics.served
        if served is not None:
            known = sum(1 for m in served.all() if m.parent is not None)
            yield GaugeMetricFamily(
                "llm_serve_adapters_known", "Adapters servable now (listed in /v1/models).", value=known
            )
        hist = HistogramMetricFamily(
            "llm_serve_adapter_load_duration_seconds", "Time to load one adapter into a LoRA slot."
        )
        buckets = [(str(b), c) for b, c in zip(LOAD_BUCKETS, stats.load_buckets, strict=True)]
        hist.add_metric([], [*buckets, ("+Inf", stats.load_count)], sum_value=stats.load_sum)
        yield hist
