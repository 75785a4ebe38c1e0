"""Evaluation throughput, local vs through `llm-serve`: the same tasks and reference prompts scored
both ways in one run, reported as samples/s and server/local ratios.

Run as:
    python -m eval.bench --adapter demo=saves/demo --limit 20
    python -m eval.bench --limit 8 --max-tokens 32 --tasks demo_mc,demo_gen

Local: lm-eval's HFLM (+ PEFT) and batched `generate`. Server: a fresh `llm-serve` on a free port
with the same model and adapters, scored with lm-eval's `local-completions` /
`local-chat-completions` and concurrent chat requests. Nothing is cached. Writes
`artifacts/eval-bench/<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from serve.atomic import write_json_atomic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llm_serve(model: str, adapters: list[str], log_path: Path, timeout: float = 300) -> tuple:
    """Start `llm-serve` on a free port and wait for /ready; returns (process, base_url)."""
    import requests

    port = _free_port()
    args = [str(Path(sys.executable).parent / "llm-serve"), "--model", model, "--port", str(port)]
    for a in adapters:
        args += ["--adapter", a]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "wb")  # noqa: SIM115 - stays open for the server's lifetime
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llm-serve exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"llm-serve not ready after {timeout} s; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--tasks", default="demo_mc,demo_gen")
    p.add_argument("--data", type=Path, default=Path("configs/data/demo/huangdi_demo.json"))
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("artifacts/eval-bench"))
    args = p.parse_args(argv)

    from eval.config import EvalConfig
    from eval.pipeline import run_eval
    from eval.tasks import SUITES_DIR

    if any("=" not in a for a in args.adapters):
        print("eval.bench: give adapters as NAME=PATH (the server needs the path)", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    common = {
        "tasks": args.tasks.split(","),
        "include_paths": [SUITES_DIR / "tasks"],
        "data": args.data if args.data.is_file() else None,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "no_cache": True,
        "embeddings": False,
        "overwrite": True,
    }
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    local = run_eval(EvalConfig(model=args.model, adapters=args.adapters, out=work / "local", **common))
    proc, url = start_llm_serve(args.model, args.adapters, args.out / f"{stamp}-llm-serve.log")
    try:
        names = [a.split("=", 1)[0] for a in args.adapters]
        served = run_eval(EvalConfig(base_url=url, adapters=names, out=work / "server", **common))
    finally:
        proc.terminate()
        proc.wait(60)
    rows = []
    for target in local["throughput"]:
        for stage in ("tasks", "generation"):
            lo = local["throughput"][target].get(stage)
            sv = served["throughput"].get(target, {}).get(stage)
            if lo and sv:
                ratio = sv["samples_per_s"] / lo["samples_per_s"] if lo["samples_per_s"] else None
                rows.append(
                    {
                        "target": target,
                        "stage": stage,
                        "samples": lo["samples"],
                        "local_samples_per_s": lo["samples_per_s"],
                        "server_samples_per_s": sv["samples_per_s"],
                        "server_over_local": ratio,
                    }
                )
    report = {
        "created": stamp,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "rows": rows,
        "local_throughput": local["throughput"],
        "server_throughput": served["throughput"],
    }
    path = args.out / f"{stamp}.json"
    write_json_atomic(path, report)
    print(f"{'target':<12}{'stage':<12}{'n':>5}{'local/s':>10}{'server/s':>10}{'server/local':>14}")
    for r in rows:
        ratio = f"{r['server_over_local']:.2f}" if r["server_over_local"] else "-"
        print(
            f"{r['target']:<12}{r['stage']:<12}{r['samples']:>5}{r['local_samples_per_s']:>10.2f}"
            f"{r['server_samples_per_s']:>10.2f}{ratio:>14}"
        )
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
