"""A/B: our server under two sets of flags, interleaved in one run, to show what a setting buys.

Run as:
    python -m serve.bench.ab --a=--no-prefix-caching --scenarios multiturn,lmeval_mc --repeats 2
    python -m serve.bench.ab --a="--step-time-ratio 0" --scenarios c16 --repeats 3

Variant A (`--a` flags) and variant B (`--b` flags, default none: the defaults) of `llm-serve` each
start `--repeats` times on a fresh server, in the order A B A B ..., so a machine whose speed drifts
(or that others share) affects both alike. Each start runs the chosen scenarios: any of
`serve.bench.run`'s (same settings and prompts) and `lmeval_mc` (`serve.bench.lmeval`: lm-eval scoring
the shipped multiple-choice task). Reports the median of each figure per variant and B/A, checks
that lm-eval's scores and log-likelihoods do not change between variants, and writes
`artifacts/bench/ab-<timestamp>.json`.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from serve.atomic import write_json_atomic
from serve.bench import peers
from serve.bench.run import SCENARIOS, BenchConfig, _exit_on_sigterm, run_scenario, scenarios_for

AB_SCENARIOS = (*SCENARIOS, "lmeval_mc")
# Figures compared per scenario: (label, path into the scenario's summary).
FIGURES = {
    "lmeval_mc": [("seconds", ("seconds",)), ("acc", ("acc",)), ("acc_norm", ("acc_norm",))],
    "multiturn": [
        ("output tok/s", ("output_throughput",)),
        ("TTFT p50 first turn s", ("turns", 0, "ttft_p50_s")),
        ("TTFT p50 last turn s", ("turns", -1, "ttft_p50_s")),
        ("TTFT last/first", ("ttft_last_over_first",)),
    ],
}
STREAM_FIGURES = [
    ("output tok/s", ("output_throughput",)),
    ("TTFT p50 s", ("ttft_s", "p50")),
    ("TPOT p50 ms", ("tpot_s", "p50")),
    ("ITL p99 ms", ("itl_s", "p99")),
    ("ITL p99 / TPOT p50", None),
]


def _pick(summary: dict, path):
    node = summary
    for key in path:
        if isinstance(key, int):
            node = node[key] if isinstance(node, list) and node else None
        else:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def figures(scenario: str, summary: dict) -> dict[str, float | None]:
    """The compared figures of one scenario run (times in ms where the label says so)."""
    if scenario in FIGURES:
        return {label: _pick(summary, path) for label, path in FIGURES[scenario]}
    out = {}
    for label, path in STREAM_FIGURES:
        if path is None:
            itl, tpot = _pick(summary, ("itl_s", "p99")), _pick(summary, ("tpot_s", "p50"))
            out[label] = itl / tpot if itl and tpot else None
            continue
        value = _pick(summary, path)
        out[label] = value * 1000 if value is not None and label.endswith("ms") else value
    return out


def run_variant(cfg: BenchConfig, flags: list[str], scenarios: list[str], tok, logs: Path, tag: str) -> dict:
    """Start `llm-serve FLAGS`, run `scenarios` against it, stop it; summaries by scenario."""
    from serve.bench.lmeval import run_lmeval
    from serve.bench.loadgen import LoadConfig, make_requests, run

    spec = peers.ours_spec(cfg.model, {}, cfg.max_num_seqs, extra=flags)
    spec.start_timeout_s = cfg.start_timeout
    print(f"[ab] {tag}: starting {' '.join(spec.cmd)}", flush=True)
    proc = peers.ServerProcess(spec, logs / f"{tag}.log")
    out: dict = {"cmd": spec.cmd, "scenarios": {}}
    try:
        proc.wait_ready()
        base = proc.base_model()
        run(
            LoadConfig(base_url=spec.base_url, concurrency=2),
            make_requests(["Hello there."] * 2, 8, 8, [base]),
        )
        planned = {sc.name: sc for sc in scenarios_for(cfg)}
        for name in scenarios:
            started = time.monotonic()
            if name == "lmeval_mc":
                summary = run_lmeval(spec.base_url, base)
            else:
                summary = run_scenario(proc, spec, planned[name], cfg, tok, base)
            out["scenarios"][name] = summary
            shown = {k: round(v, 3) for k, v in figures(name, summary).items() if v is not None}
            print(f"[ab] {tag}: {name} ({time.monotonic() - started:.0f} s): {shown}", flush=True)
    finally:
        proc.stop()
    return out


def compare(runs: list[dict], scenarios: list[str]) -> list[dict]:
    """Median of each figure per variant over its repeats, and B/A."""
    rows = []
    for name in scenarios:
        per_variant: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
        for r in runs:
            summary = r["result"]["scenarios"].get(name)
            if summary is None:
                continue
            for label, value in figures(name, summary).items():
                if value is not None:
                    per_variant[r["variant"]].setdefault(label, []).append(value)
        labels = dict.fromkeys([*per_variant["A"], *per_variant["B"]])
        for label in labels:
            a, b = per_variant["A"].get(label, []), per_variant["B"].get(label, [])
            ma = statistics.median(a) if a else None
            mb = statistics.median(b) if b else None
            rows.append({
                "scenario": name, "figure": label, "a": a, "b": b, "a_median": ma, "b_median": mb,
                "b_over_a": mb / ma if ma and mb is not None else None,
            })  # fmt: skip
    return rows


def lmeval_agreement(runs: list[dict]) -> dict | None:
    """Largest log-likelihood difference between any two lm-eval runs, and whether scores match."""
    results = [r["result"]["scenarios"]["lmeval_mc"] for r in runs if "lmeval_mc" in r["result"]["scenarios"]]
    if len(results) < 2:
        return None
    first = [x for row in results[0]["logliks"] for x in row]
    worst = 0.0
    for other in results[1:]:
        flat = [x for row in other["logliks"] for x in row]
        worst = max([worst, *(abs(x - y) for x, y in zip(first, flat, strict=True))])
    same = len({(r["acc"], r["acc_norm"]) for r in results}) == 1
    return {"max_abs_loglik_diff": worst, "scores_identical": same}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def render(rows: list[dict], a_flags: str, b_flags: str, agreement: dict | None) -> str:
    lines = [f"A: llm-serve {a_flags or '(defaults)'}", f"B: llm-serve {b_flags or '(defaults)'}", ""]
    header = f"{'scenario':<12}{'figure':<24}{'A median':>10}{'B median':>10}{'B/A':>8}  runs A | B"
    lines += [header, "-" * len(header)]
    for r in rows:
        runs = f"{' '.join(_fmt(x) for x in r['a'])} | {' '.join(_fmt(x) for x in r['b'])}"
        lines.append(
            f"{r['scenario']:<12}{r['figure']:<24}{_fmt(r['a_median']):>10}{_fmt(r['b_median']):>10}"
            f"{_fmt(r['b_over_a']):>8}  {runs}"
        )
    if agreement:
        lines.append(
            f"\nlm-eval across all runs: scores identical: {agreement['scores_identical']}, "
            f"max |delta log-likelihood| {agreement['max_abs_loglik_diff']:.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwind, so each server is stopped
    p = argparse.ArgumentParser(prog="python -m serve.bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", default="", help="llm-serve flags of variant A (one string)")
    p.add_argument("--b", default="", help="llm-serve flags of variant B (default: none)")
    p.add_argument(
        "--scenarios", default="multiturn,lmeval_mc", help=f"comma-separated, from {','.join(AB_SCENARIOS)}"
    )
    p.add_argument("--repeats", type=int, default=2, help="server starts per variant")
    p.add_argument("--model", default="default")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument(
        "--rounds", type=int, default=2, help="requests per concurrent scenario = streams x rounds"
    )
    p.add_argument("--multiturn-output-len", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="run.py's quick settings (1 round, 64-token replies)")
    p.add_argument("--out-dir", type=Path, default=Path("artifacts/bench"))
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in AB_SCENARIOS]
    if bad or args.repeats < 1:
        print(f"error: --scenarios: unknown {bad}; choose from {', '.join(AB_SCENARIOS)}", file=sys.stderr)
        return 2
    if "c16_adapters" in scenarios or "memory" in scenarios:
        print(
            "error: the A/B runs the base model only (no adapters): drop c16_adapters and memory",
            file=sys.stderr,
        )
        return 2

    from serve.bench.prompts import load_tokenizer
    from serve.models import resolve_model

    cfg = BenchConfig(
        model=args.model, max_num_seqs=args.max_num_seqs, rounds=args.rounds, quick=args.quick,
        multiturn_output_len=args.multiturn_output_len, scenarios=[s for s in scenarios if s in SCENARIOS],
    )  # fmt: skip
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out_dir / f"ab-{stamp}.json"
    logs = (args.out_dir / "logs" / f"ab-{stamp}").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(str(resolve_model(args.model).path))
    data: dict = {"started": stamp, "a": args.a, "b": args.b, "scenarios": scenarios, "runs": [],
                  "config": cfg.model_dump(mode="json"), "note": "medians over interleaved repeats"}  # fmt: skip
    try:
        for i in range(args.repeats):
            for variant, flags in (("A", args.a), ("B", args.b)):
                result = run_variant(cfg, shlex.split(flags), scenarios, tok, logs, f"{variant}{i + 1}")
                data["runs"].append({"variant": variant, "repeat": i + 1, "result": result})
                data["comparison"] = compare(data["runs"], scenarios)
                data["lmeval_agreement"] = lmeval_agreement(data["runs"])
                write_json_atomic(out_path, data, default=str)
    except (peers.PeerError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print()
    print(render(data["comparison"], args.a, args.b, data["lmeval_agreement"]))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
