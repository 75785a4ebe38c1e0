"""Unit tests of the benchmark's statistics and target checks (pure functions, no server)."""

from __future__ import annotations

import numpy as np
import pytest

from serve.bench import report
from serve.bench.stats import RequestResult, memory_trend, percentile, summarize


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases():
    assert percentile([], 50) is None
    assert percentile([2.0], 99) == 2.0
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)


def _result(start, ttft, n_tokens, gap, ok=True, error=None):
    # n_tokens content chunks: the first at start+ttft, then one every `gap` seconds
    itl = [gap] * (n_tokens - 1)
    return RequestResult(
        ok=ok, model="m", prompt_tokens=10, output_tokens=n_tokens if ok else 0,
        start=start, end=start + ttft + gap * (n_tokens - 1), ttft=ttft if ok else None,
        itl=itl if ok else [], error=error,
    )  # fmt: skip


def test_summarize_throughput_latency_and_failures():
    results = [
        _result(0.0, 0.5, 11, 0.1),  # ends at 1.5
        _result(0.5, 1.5, 11, 0.2),  # ends at 4.0
        RequestResult(
            ok=False, model="m", prompt_tokens=10, output_tokens=0, start=1.0, end=1.2, error="HTTP 500"
        ),
    ]
    s = summarize(results)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["errors"] == ["HTTP 500"]
    assert s["duration_s"] == pytest.approx(4.0)
    assert s["output_tokens_total"] == 22
    assert s["output_throughput"] == pytest.approx(22 / 4.0)
    assert s["request_throughput"] == pytest.approx(2 / 4.0)
    assert s["ttft_s"]["p50"] == pytest.approx(1.0)
    assert s["tpot_s"]["mean"] == pytest.approx(0.15)
    assert s["itl_s"]["p50"] == pytest.approx(0.15)  # 10 gaps of 0.1 and 10 of 0.2
    assert s["stream_decode_tok_s"] == pytest.approx(1 / 0.15)
    assert s["e2e_latency_s"]["p99"] == pytest.approx(1.5 + 0.99 * 2.0)


def test_tpot_undefined_for_one_token():
    r = _result(0.0, 0.3, 1, 0.1)
    assert r.tpot is None
    assert summarize([r])["tpot_s"]["p50"] is None


def test_memory_trend_flat_and_growing():
    mb = 2**20
    warmup = [(i, (500 + 10 * i) * mb) for i in range(10)]  # climbs while pools fill
    flat = warmup + [(10 + i, (600 + (i % 3)) * mb) for i in range(40)]
    grow = warmup + [(10 + i, (600 + 5 * i) * mb) for i in range(40)]
    f, g = memory_trend(flat), memory_trend(grow)
    assert not f["grows"] and abs(f["growth_mb"]) < 5
    assert g["grows"] and g["growth_mb"] > 100
    assert g["peak_rss_mb"] == pytest.approx(795)
    with pytest.raises(ValueError, match="at least 5"):
        memory_trend(flat[:4])


def _targets(single, c16, c16a, lf_c16, ttft, grows, turns=1.2, json_ratio=0.95):
    def sc(tput, ttft_p50=None, stutter=1.5 if grows is False else 2.5):
        return {
            "output_throughput": tput, "ttft_s": {"p50": ttft_p50},
            "tpot_s": {"p50": 0.1}, "itl_s": {"p99": 0.1 * stutter},
        }  # fmt: skip

    return {
        "ours": {"status": "ok", "scenarios": {
            "single": sc(single), "c16": sc(c16, ttft), "c16_adapters": sc(c16a),
            "memory": {"memory": {"grows": grows}}, "multiturn": {"ttft_last_over_first": turns},
            "c16_json": {**sc(c16), "json_vs_unconstrained": json_ratio},
        }},
        "llamafactory": {"status": "ok", "scenarios": {"single": sc(10.0), "c16": sc(lf_c16)}},
        "llama-cpp-f32": {"status": "ok", "scenarios": {"single": sc(20.0), "c16": sc(125.0)}},
        "ours-int8": {"status": "ok", "scenarios": {"single": sc(2 * single), "c16": sc(c16), "c16_adapters": sc(c16a)}},
        "llama-cpp-q8_0": {"status": "ok", "scenarios": {"single": sc(40.0), "c16": sc(125.0)}},
        "ours-llama-cpp": {"status": "ok", "scenarios": {"single": sc(single), "c16": sc(c16), "c16_adapters": sc(c16a)}},
        "ours-llama-cpp-q8_0": {"status": "ok", "scenarios": {"single": sc(2 * single), "c16": sc(c16)}},
    }  # fmt: skip


def _many(ratio: float, grows: bool) -> dict:
    return {"ours": {"status": "ok", "random_over_base": ratio, "memory": {"memory": {"grows": grows}}}}


def test_checks_pass_and_fail():
    good_targets = _targets(22.0, 130.0, 120.0, 11.0, 1.2, False)
    good = {c["target"]: c["pass"] for c in report.checks(good_targets, _many(0.8, False))}
    assert all(good.values()), good
    bad_targets = _targets(15.0, 100.0, 60.0, 11.0, 3.0, True, 2.0, 0.8)
    bad = {c["target"]: c["pass"] for c in report.checks(bad_targets, _many(0.5, True))}
    assert not any(bad.values()), bad
    assert bad["64 adapters, 8 slots, random / base-only at 16 streams"] is False
    assert good["16 streams: ITL p99 / TPOT p50"] and bad["16 streams: ITL p99 / TPOT p50"] is False


def test_ratios_and_missing_figures():
    t = _targets(22.0, 132.0, 99.0, 11.0, 1.0, False)
    assert report.ratios(t)["llamafactory"] == {"single": pytest.approx(2.2), "c16": pytest.approx(12.0)}
    assert report.adapter_ratios(t)["ours"] == pytest.approx(0.75)
    del t["llamafactory"]
    rows = {c["target"]: c for c in report.checks(t)}
    assert rows["16 streams: ours / llamafactory"]["pass"] is None
    assert "n/a" in report.render({"targets": {}, "checks": report.checks(t)})
