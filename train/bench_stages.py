"""Every stage through `llm-train` a few steps each, and 1 process against 2: seconds, tokens/s, loss.

Run as `python -m train.bench_stages [--steps 4 --cutoff-len 128 --only pt,rm]`. Each stage trains the
default model on LLaMA-Factory's demo data with the same small settings (ppo against the rm run's
reward model). The DDP pair trains the same rows with the same seed and global batch: 1 process x 2
per device, then 2 processes x 1 per device, and compares their loss curves. Figures come from each run's
run_manifest.json: `wall_seconds` is the whole `llm-train` launch (checks, model load, training, save),
`train_runtime` and `tokens_per_second` the trainer's loop only. Writes
`artifacts/bench-train/stages.json` and prints a table. The machine's load changes the figures: compare
rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from serve.artifacts.run_manifest import read_manifest
from serve.atomic import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO.parent / "shared" / "data" / "llamafactory-demo"
LLM_TRAIN = str(Path(sys.executable).parent / "llm-train")


def stage_configs(data: Path, steps: int, cutoff: int) -> dict[str, dict[str, Any]]:
    common = {"dataset_dir": str(data), "max_steps": steps, "cutoff_len": cutoff, "max_samples": 64}
    common |= {"per_device_train_batch_size": 2, "learning_rate": 1e-4, "logging_steps": 1}
    return {
        "sft-lora": {**common, "stage": "sft", "dataset": "alpaca_en_demo"},
        "pt-lora": {**common, "stage": "pt", "dataset": "c4_demo"},
        "rm-lora": {**common, "stage": "rm", "dataset": "dpo_en_demo"},
        "dpo-lora": {**common, "stage": "dpo", "dataset": "dpo_en_demo"},
        "kto-lora": {**common, "stage": "kto", "dataset": "kto_en_demo"},
        "ppo-lora": {
            **common,
            "stage": "ppo",
            "dataset": "alpaca_en_demo",
            "max_new_tokens": 16,
            "ppo_epochs": 1,
        },
        "sft-full": {**common, "stage": "sft", "dataset": "identity", "finetuning_type": "full"},
        "sft-freeze": {**common, "stage": "sft", "dataset": "identity", "finetuning_type": "freeze"},
    }


def run_one(work: Path, name: str, cfg: dict[str, Any], *flags: str) -> dict[str, Any]:
    out = work / name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "default", "output_dir": str(out), **cfg}))
    t0 = time.monotonic()
    proc = subprocess.run(
        [LLM_TRAIN, str(path), "--no-progress", "--overwrite", *flags], capture_output=True, text=True
    )
    row: dict[str, Any] = {
        "name": name,
        "seconds": round(time.monotonic() - t0, 1),
        "ok": proc.returncode == 0,
    }
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"
        return row
    manifest = read_manifest(out)
    m = manifest.metrics
    row.update(
        final_loss=m.get("final_loss"),
        train_runtime=m.get("train_runtime"),
        tokens_per_second=m.get("tokens_per_second"),
        tokens=m.get("num_input_tokens_seen"),
        final_reward=m.get("final_reward"),
        world_size=manifest.parallel.world_size if manifest.parallel else 1,
        losses=[
            r["loss"]
            for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in r
        ],
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--data", type=Path, default=DEMO_DATA, help="LLaMA-Factory demo data directory")
    p.add_argument("--only", help="comma-separated subset of the stages, plus ddp")
    p.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench-train" / "stages.json")
    args = p.parse_args(argv)

    configs = stage_configs(args.data, args.steps, args.cutoff_len)
    wanted = set(args.only.split(",")) if args.only else {*configs, "ddp"}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        work = Path(tmp)
        for name, cfg in configs.items():
            if name not in wanted:
                continue
            if name == "ppo-lora":
                cfg = {**cfg, "reward_model": str(work / "rm-lora")}
            rows.append(run_one(work, name, cfg))
            print(_line(rows[-1]), flush=True)
        ddp = None
        if "ddp" in wanted:
            same = {**configs["sft-lora"], "seed": 7}
            one = run_one(work, "ddp-1x2", {**same, "per_device_train_batch_size": 2})
            two = run_one(
                work, "ddp-2x1", {**same, "per_device_train_batch_size": 1}, "--nproc-per-node", "2"
            )
            rows += [one, two]
            for r in (one, two):
                print(_line(r), flush=True)
            if one["ok"] and two["ok"]:
                diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)]
                ddp = {
                    "max_abs_loss_diff": max(diffs),
                    "tokens_per_second_ratio_2_over_1": round(
                        two["tokens_per_second"] / one["tokens_per_second"], 3
                    ),
                }
                print(
                    f"ddp: max |loss(1x2) - loss(2x1)| = {ddp['max_abs_loss_diff']:.2e}; 2-process/1-process "
                    f"tokens/s = {ddp['tokens_per_second_ratio_2_over_1']}"
                )
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"steps": args.steps, "cutoff_len": args.cutoff_len, "per_device_train_batch_size": 2},
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
        "ddp": ddp,
    }
    write_json_atomic(args.out, result)
    print(f"bench-stages: {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _line(r: dict[str, Any]) -> str:
    if not r["ok"]:
        return f"{r['name']:<12} FAILED after {r['seconds']} s: {r.get('error')}"
    tps = r.get("tokens_per_second")
    extra = f"  reward {r['final_reward']:.3f}" if r.get("final_reward") is not None else ""
    return (
        f"{r['name']:<12} {r['seconds']:>6.1f} s launch  {r.get('train_runtime') or 0:>6.1f} s training  "
        f"{(f'{tps:.1f}' if tps else '-'):>6} tok/s  loss {r['final_loss']:.4f}  world {r['world_size']}{extra}"
    )


if __name__ == "__main__":
    sys.exit(main())
