"""Run the real `llm-train` for end-to-end tests: tiny configs, the console script as a user runs it.

cfg = write_config(tmp_path, dataset="huangdi_demo", dataset_dir=..., max_steps=2, output_dir=...)
result = llm_train(cfg, "--no-progress")
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

LLM_TRAIN = str(Path(sys.executable).parent / "llm-train")
# A few steps of short samples: enough to exercise every path, seconds per step on the default model.
TINY = {"cutoff_len": 64, "per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": 5.0e-4}


def write_config(tmp_path: Path, name: str = "cfg.yaml", **kw) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model_name_or_path": "default", **TINY, **kw}, allow_unicode=True))
    return path


def llm_train(*args, timeout=900, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLM_TRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def start_llm_train(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [LLM_TRAIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by optimizer step, from LLaMA-Factory's trainer_log.jsonl."""
    from train.manifest import read_trainer_log

    return {r["current_steps"]: r["loss"] for r in read_trainer_log(run_dir) if "loss" in r}


def interrupt_after_first_step(proc: subprocess.Popen, staging: Path, sig=signal.SIGINT, timeout=600):
    """Send `sig` to llm-train once its first step is logged; returns (returncode, stderr)."""
    deadline = time.monotonic() + timeout
    while not losses(staging) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def manifest(out: Path) -> dict:
    return json.loads((out / "run_manifest.json").read_text())
