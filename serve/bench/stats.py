"""Benchmark statistics: per-request results in, `vllm bench serve`-style metrics out.

Pure functions with no I/O, so the figures the benchmark prints are unit-tested directly:
TTFT (time to first token), TPOT (time per output token after the first), ITL (gaps between streamed
chunks), end-to-end latency, request and output-token throughput, and whether memory grows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds, from `time.perf_counter`)."""

    ok: bool
    model: str
    prompt_tokens: int  # reported by the server when it sends usage, else the length we built
    output_tokens: int  # usage.completion_tokens when reported, else counted from the text
    start: float
    end: float
    ttft: float | None = None  # first chunk with content minus start
    itl: list[float] = field(default_factory=list)  # gaps between content chunks after the first
    text: str = ""
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for single-token outputs)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation, as numpy's default; None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
    }


def summarize(results: Sequence[RequestResult]) -> dict:
    """Aggregate metrics for one scenario; the duration runs from the first start to the last end."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    out_tokens = sum(r.output_tokens for r in done)
    itl = [gap for r in done for gap in r.itl]
    per_req_ttft = [r.ttft for r in done if r.ttft is not None]
    tpots = [t for r in done if (t := r.tpot) is not None]
    return {
        "completed": len(done),
        "failed": len(failed),
        "errors": sorted({r.error or "unknown" for r in failed})[:5],
        "duration_s": duration,
        "prompt_tokens_total": sum(r.prompt_tokens for r in done),
        "output_tokens_total": out_tokens,
        "output_tokens_per_request": _dist([r.output_tokens for r in done]),
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "ttft_s": _dist(per_req_ttft),
        "tpot_s": _dist(tpots),
        "itl_s": _dist(itl),
        "e2e_latency_s": _dist([r.latency for r in done]),
        # Decode speed one stream sees (1 / median TPOT): the prompt's prefill is not in it.
        "stream_decode_tok_s": 1.0 / p if (p := percentile(tpots, 50)) else None,
    }


def memory_trend(
    checkpoints: Sequence[tuple[int, int]], *, min_growth_mb: float = 64.0, min_growth_frac: float = 0.05
) -> dict:
    """Judge whether resident memory grows across requests.

    `checkpoints` are (requests completed, RSS bytes) pairs in order. The first fifth is warm-up
    (allocator pools and caches fill there); growth is the median RSS of the last fifth minus that of
    the second fifth. It "grows" when that exceeds both `min_growth_mb` and `min_growth_frac` of the
    baseline: noise from the allocator stays under both.
    """
    if len(checkpoints) < 5:
        raise ValueError(f"need at least 5 memory checkpoints to judge a trend, got {len(checkpoints)}")
    rss = [b for _, b in checkpoints]
    k = len(rss) // 5
    baseline = percentile(rss[k : 2 * k], 50) or 0.0
    final = percentile(rss[-k:], 50) or 0.0
    growth = final - baseline
    mb = 1024 * 1024
    return {
        "checkpoints": [[n, b] for n, b in checkpoints],
        "baseline_rss_mb": baseline / mb,
        "final_rss_mb": final / mb,
        "peak_rss_mb": max(rss) / mb,
        "growth_mb": growth / mb,
        "grows": growth / mb > min_growth_mb and growth > min_growth_frac * baseline,
    }
