"""Turn a benchmark run's figures into ratios, target checks and a printed table.

Input is the `targets` mapping `run.py` builds: {target: {"status", "scenarios": {name: summary}}}
with summaries from `serve.bench.stats.summarize`. Ratios compare targets measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

OURS = "ours"
INT8, Q8 = "ours-int8", "llama-cpp-q8_0"  # `--quantize int8` and its peer at about the same precision
F32 = "llama-cpp-f32"
# `llm-serve --engine llama-cpp` (f32, and q8_0 with --quantize int8): ours too, set against the same peers.
OURS_CPP, OURS_CPP_Q8 = "ours-llama-cpp", "ours-llama-cpp-q8_0"
OURS_FAMILY = (OURS, INT8, OURS_CPP, OURS_CPP_Q8)


@dataclass(frozen=True)
class Goal:
    """One goal (issues 3, 17 and 19): a figure, how to compare it, and the bound."""

    name: str
    op: str  # ">=", "<", "<=" or "=="
    bound: float | bool


def _get(targets: dict, target: str, scenario: str, *keys: str):
    node = targets.get(target, {}).get("scenarios", {}).get(scenario)
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def ratios(targets: dict) -> dict:
    """{peer: {scenario: ours output tok/s / peer output tok/s}} for scenarios both measured."""
    out: dict = {}
    for peer in targets:
        if peer in OURS_FAMILY:  # ours in other modes: the checks set them against their llama.cpp peer
            continue
        per: dict = {}
        for scenario in targets.get(OURS, {}).get("scenarios", {}):
            ours = _get(targets, OURS, scenario, "output_throughput")
            theirs = _get(targets, peer, scenario, "output_throughput")
            if ours and theirs:
                per[scenario] = ours / theirs
        if per:
            out[peer] = per
    return out


def _ratio(targets: dict, a: str, b: str, scenario: str) -> float | None:
    """`a`'s output tok/s over `b`'s in `scenario` (None unless both measured it)."""
    x, y = _get(targets, a, scenario, "output_throughput"), _get(targets, b, scenario, "output_throughput")
    return x / y if x and y else None


def stutter(targets: dict, target: str) -> float | None:
    """ITL p99 / TPOT p50 at 16 streams (issue 19: streams do not stutter while prompts are admitted)."""
    itl, tpot = _get(targets, target, "c16", "itl_s", "p99"), _get(targets, target, "c16", "tpot_s", "p50")
    return itl / tpot if itl and tpot else None


def adapter_ratios(targets: dict) -> dict:
    """{target: c16_adapters tok/s / c16 tok/s}: what serving 4 adapters costs each server."""
    out = {}
    for target in targets:
        base = _get(targets, target, "c16", "output_throughput")
        mixed = _get(targets, target, "c16_adapters", "output_throughput")
        if base and mixed:
            out[target] = mixed / base
    return out


def json_ratios(targets: dict) -> dict:
    """{target: json_schema tok/s / unconstrained tok/s at 16 streams} (median over interleaved rounds)."""
    out = {}
    for target in targets:
        ratio = _get(targets, target, "c16_json", "json_vs_unconstrained")
        if ratio:
            out[target] = ratio
    return out


def checks(targets: dict, many: dict | None = None) -> list[dict]:
    """The issues' goals against our figures; `pass` is None when the figure was not measured.
    `many`: the many_adapters figures per target (issue 14), when measured."""
    all_ratios = ratios(targets)
    vs_lf = all_ratios.get("llamafactory", {}).get("c16")
    vs_cpp = all_ratios.get("llama-cpp-f32", {})
    trend = _get(targets, OURS, "memory", "memory")
    ours_many = (many or {}).get(OURS, {})
    many_trend = (ours_many.get("memory") or {}).get("memory")
    rows = [
        (Goal("one stream output tok/s", ">=", 20.0), _get(targets, OURS, "single", "output_throughput")),
        (Goal("16 streams total output tok/s", ">=", 120.0), _get(targets, OURS, "c16", "output_throughput")),
        (Goal("16 streams: ours / llamafactory", ">=", 10.0), vs_lf),
        (Goal("4 adapters / base-only at 16 streams", ">=", 0.85), adapter_ratios(targets).get(OURS)),
        (Goal("json_schema / unconstrained at 16 streams", ">=", 0.9), json_ratios(targets).get(OURS)),
        (
            Goal("TTFT p50 at 16 streams x 128-token prompts (s)", "<", 2.0),
            _get(targets, OURS, "c16", "ttft_s", "p50"),
        ),
        (Goal("16 streams: ITL p99 / TPOT p50", "<=", 2.0), stutter(targets, OURS)),
        (Goal("RSS grows across the memory scenario", "==", False), trend.get("grows") if trend else None),
        (Goal("one stream: ours / llama.cpp f32", ">=", 1.0), vs_cpp.get("single")),
        (Goal("16 streams: ours / llama.cpp f32", ">=", 1.0), vs_cpp.get("c16")),
        (Goal("one stream: ours-int8 / llama.cpp q8_0", ">=", 1.0), _ratio(targets, INT8, Q8, "single")),
        (Goal("16 streams: ours-int8 / llama.cpp q8_0", ">=", 1.0), _ratio(targets, INT8, Q8, "c16")),
        (
            Goal("ours-int8: 4 adapters / base-only at 16 streams", ">=", 0.85),
            adapter_ratios(targets).get(INT8),
        ),
        (
            Goal("one stream: ours-llama-cpp / llama.cpp f32", ">=", 1.0),
            _ratio(targets, OURS_CPP, F32, "single"),
        ),
        (
            Goal("16 streams: ours-llama-cpp / llama.cpp f32", ">=", 1.0),
            _ratio(targets, OURS_CPP, F32, "c16"),
        ),
        (
            Goal("one stream: ours-llama-cpp-q8_0 / llama.cpp q8_0", ">=", 1.0),
            _ratio(targets, OURS_CPP_Q8, Q8, "single"),
        ),
        (
            Goal("16 streams: ours-llama-cpp-q8_0 / llama.cpp q8_0", ">=", 1.0),
            _ratio(targets, OURS_CPP_Q8, Q8, "c16"),
        ),
        (
            Goal("ours-llama-cpp: 4 adapters / base-only at 16 streams", ">=", 0.85),
            adapter_ratios(targets).get(OURS_CPP),
        ),
        (
            Goal("64 adapters, 8 slots, random / base-only at 16 streams", ">=", 0.70),
            ours_many.get("random_over_base"),
        ),
        (
            Goal("RSS grows across the random-adapter requests", "==", False),
            many_trend.get("grows") if many_trend else None,
        ),
        (
            Goal("multiturn: TTFT p50 last turn / first turn", "<=", 1.5),
            _get(targets, OURS, "multiturn", "ttft_last_over_first"),
        ),
    ]
    out = []
    for goal, value in rows:
        if value is None:
            ok = None
        elif goal.op == ">=":
            ok = value >= goal.bound
        elif goal.op == "<":
            ok = value < goal.bound
        elif goal.op == "<=":
            ok = value <= goal.bound
        else:
            ok = value == goal.bound
        out.append({"target": goal.name, "measured": value, "goal": f"{goal.op} {goal.bound}", "pass": ok})
    return out


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(report: dict) -> str:
    """The printed summary: per-scenario figures, ratios against peers, and the targets."""
    targets = report["targets"]
    rows, notes = [], []
    for target, info in targets.items():
        if info.get("status") != "ok":
            first_line = str(info.get("error", "")).splitlines()[0] if info.get("error") else ""
            notes.append(f"{target}: {info.get('status')}: {first_line[:200]}")
        for name, s in info.get("scenarios", {}).items():
            rows.append([
                target, name, _fmt(s.get("concurrency")), f"{s['completed']}/{s['completed'] + s['failed']}",
                _fmt(s["output_throughput"], 1), _fmt(s["request_throughput"], 2),
                f"{_fmt(s['ttft_s']['p50'])}/{_fmt(s['ttft_s']['p99'])}",
                f"{_fmt(_ms(s['tpot_s']['p50']), 0)}/{_fmt(_ms(s['tpot_s']['p99']), 0)}",
                f"{_fmt(_ms(s['itl_s']['p50']), 0)}/{_fmt(_ms(s['itl_s']['p99']), 0)}",
                _fmt(s.get("stream_decode_tok_s"), 1), _fmt(s.get("peak_rss_mb"), 0),
            ])  # fmt: skip
    header = ["target", "scenario", "conc", "ok", "out tok/s", "req/s", "TTFT p50/p99 s",
              "TPOT p50/p99 ms", "ITL p50/p99 ms", "stream tok/s", "peak RSS MB"]  # fmt: skip
    parts = [_table(header, rows), *(["\n".join(notes)] if notes else [])]

    ratio_rows = [
        [peer, sc, _fmt(r)] for peer, per in report.get("ratios", {}).items() for sc, r in per.items()
    ]
    if ratio_rows:
        parts.append(_table(["ours / peer", "scenario", "output tok/s ratio"], ratio_rows))
    adapter_rows = [[t, _fmt(r)] for t, r in report.get("adapter_ratios", {}).items()]
    if adapter_rows:
        parts.append(_table(["target", "4 adapters / base (16 streams)"], adapter_rows))
    json_rows = [
        [t, _fmt(r), str(_get(targets, t, "c16_json", "follows_schema"))]
        for t, r in json_ratios(targets).items()
    ]
    if json_rows:
        parts.append(
            _table(["target", "json_schema / unconstrained (16 streams)", "follow the schema"], json_rows)
        )
    compile_s = report.get("grammar_compile")
    if compile_s:
        parts.append(
            f"grammar compile for the c16_json schema: cold {compile_s['cold_s'] * 1000:.1f} ms, cached "
            f"{compile_s['cached_s'] * 1e6:.0f} us (vocabulary table once per tokenizer: {compile_s['vocabulary_table_s']:.2f} s); "
            f"grammar work per decode step for 16 constrained rows: {compile_s.get('mask_ms_per_step_16_rows', 0):.2f} ms"
        )
    mem = _get(targets, OURS, "memory", "memory")
    if mem:
        parts.append(
            f"memory over {mem['checkpoints'][-1][0]} requests: baseline {mem['baseline_rss_mb']:.0f} MB, "
            f"final {mem['final_rss_mb']:.0f} MB, peak {mem['peak_rss_mb']:.0f} MB, "
            f"growth {mem['growth_mb']:+.0f} MB -> {'GROWS' if mem['grows'] else 'flat'}"
        )
    turn_rows = [
        [
            t,
            f"{row['turn']}",
            _fmt(row["prompt_tokens_p50"], 0),
            _fmt(row["ttft_p50_s"]),
            _fmt(row["ttft_p99_s"]),
        ]
        for t, info in targets.items()
        for row in info.get("scenarios", {}).get("multiturn", {}).get("turns", [])
    ]
    if turn_rows:
        parts.append(
            _table(["target", "multiturn turn", "prompt tokens p50", "TTFT p50 s", "TTFT p99 s"], turn_rows)
        )
    check_rows = [
        [c["target"], _fmt(c["measured"]), c["goal"], {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]]
        for c in report.get("checks", [])
    ]
    if report.get("many_adapters"):
        from serve.bench.adapter_dir import render as render_many

        parts.append(render_many(report["many_adapters"]))
    parts.append(_table(["goal (issues 3, 14, 17, 19)", "measured", "bound", "result"], check_rows))
    return "\n\n".join(parts)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
