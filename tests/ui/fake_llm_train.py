"""A stand-in for `llm-train CONFIG [--resume] [--overwrite] --no-progress` in the run manager's fast tests.

Writes LLaMA-Factory-shaped `trainer_log.jsonl` rows into `.NAME.partial/` like the real trainer, then
publishes `NAME/` (adapter files, run_manifest.json, loss.png). Behaviour from `FAKE_TRAIN`:
`ok` (default: STEPS steps, FAKE_STEP_S apart), `fail` (prints an error, exits 1), `wait` (logs steps
until SIGTERM, then keeps a checkpoint and exits 130, as llm-train does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

STEPS = 4


def main(argv: list[str]) -> int:
    cfg = yaml.safe_load(Path(argv[0]).read_text())
    out = Path(cfg["output_dir"])
    staging = out.parent / f".{out.name}.partial"
    mode = os.environ.get("FAKE_TRAIN", "ok")
    step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
    print(f"llm-train: {cfg['stage']}/lora on {cfg['model_name_or_path']}", flush=True)
    if mode == "fail":
        print("llm-train: error: LLaMA-Factory exited with status 1; last lines of train.log:", flush=True)
        print("RuntimeError: something broke in step 1", flush=True)
        return 1
    first = 1
    if "--resume" in argv:
        checkpoints = sorted(staging.glob("checkpoint-*"))
        if not checkpoints:
            print("llm-train: error: nothing to resume", flush=True)
            return 1
        first = int(checkpoints[-1].name.split("-")[1]) + 1
    elif staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    total = STEPS if mode == "ok" else 10_000
    step = first
    while step <= total:
        row = {"current_steps": step, "total_steps": total, "loss": 2.0 / step, "throughput": 100.0 + step}
        row.update(elapsed_time="0:00:01", remaining_time="0:00:02")
        with open(staging / "trainer_log.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        if step % 2 == 0:
            with open(staging / "trainer_log.jsonl", "a") as log:
                log.write(
                    json.dumps({"current_steps": step, "total_steps": total, "eval_loss": 2.5 / step}) + "\n"
                )
        time.sleep(step_s)
        if stop["now"]:
            checkpoint = staging / f"checkpoint-{step}"
            checkpoint.mkdir()
            (checkpoint / "trainer_state.json").write_text("{}")
            (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
            print("llm-train: training interrupted; checkpoint kept", flush=True)
            return 130
        step += 1
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png"):
        (staging / name).write_bytes(b"{}")
    manifest = {
        "schema_version": 1,
        "base_model": {"name": cfg["model_name_or_path"]},
        "stage": cfg["stage"],
        "datasets": [{"name": cfg["dataset"]}],
        "metrics": {"steps": total, "final_loss": 2.0 / total},
    }
    (staging / "run_manifest.json").write_text(json.dumps(manifest))
    for checkpoint in staging.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    print(f"llm-train: done: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
