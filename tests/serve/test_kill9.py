"""`kill -9` of each command that writes a folder, as a user would meet it (issue 20's crash safety).

- `llm-train`: no adapter appears at output_dir, the worker still checkpoints, `--resume` completes
  and every step is logged once.
- `llm-export`: the output is absent (never half-written) and a re-run succeeds, removing the killed
  run's hidden staging folder.
- the first conversion of the default model (its own LLM_SERVE_HOME): the cache stays usable, the
  next command converts it again, byte for byte the same checkpoint, and nothing stale is left.

Each kill happens while the weights are being written, the moment a half-written folder would appear.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serve.artifacts.publish import FolderBusyError, lock_dir

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}: {out[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def unowned(folder: Path) -> bool:
    try:
        with lock_dir(folder):
            return True
    except FolderBusyError:
        return False


def start(*cmd, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_kill9_llm_train_then_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "sft"
    staging = tmp_path / ".sft.partial"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "dataset": "huangdi_demo",
                "dataset_dir": str(REPO / "configs" / "data" / "demo"),
                "max_samples": 16,
                "cutoff_len": 32,
                "per_device_train_batch_size": 2,
                "max_steps": 6,
                "save_steps": 2,
                "logging_steps": 1,
                "output_dir": str(out),
            }
        )
    )
    proc = start(BIN / "llm-train", cfg, "--no-progress")
    wait_for(lambda: list(staging.glob("checkpoint-*/trainer_state.json")), 400, proc, "a first checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    # The worker outlives llm-train long enough to checkpoint; it owns the staging folder until it exits.
    wait_for(lambda: unowned(staging), 120, what="the worker to exit")
    assert not out.exists()
    assert list(staging.glob("checkpoint-*/trainer_state.json"))

    resumed = subprocess.run(
        [str(BIN / "llm-train"), str(cfg), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "run_manifest.json").is_file()
    assert not staging.exists()
    steps = [
        r["current_steps"]
        for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps  # every step logged once


def test_kill9_llm_export_then_rerun(tmp_path):
    from tests.export.tiny_models import byte_bpe_tokenizer, tiny_checkpoint
    from tests.helpers.adapters import make_lora_adapter

    base = tiny_checkpoint("llama", byte_bpe_tokenizer(tmp_path / "src" / "bpe"), tmp_path / "src" / "base")
    adapter = make_lora_adapter(base, tmp_path / "src" / "a", seed=0)
    out = tmp_path / "merged"
    cmd = [BIN / "llm-export", "--adapter", adapter, "--out", out, "--max-new-tokens", "2"]
    proc = start(*cmd)
    weights = wait_for(
        lambda: list(tmp_path.glob(".merged.tmp-*/model.safetensors")), 300, proc, "the merged weights"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()  # absent, never half-written
    stale = weights[0].parent
    assert stale.is_dir()  # what a killed run leaves: a hidden staging folder nobody owns

    rerun = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "export_report.json").read_text())["status"] == "passed"
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_kill9_during_the_first_conversion_leaves_the_cache_usable(tmp_path, default_model):
    from serve.artifacts.provenance import file_sha256

    home = tmp_path / "home"
    env = {**os.environ, "LLM_SERVE_HOME": str(home)}
    models = home / "models"
    proc = start(BIN / "llm-models", "pull", "default", env=env)
    wait_for(
        lambda: list(models.glob(f".{default_model.path.name}.tmp-*/model.safetensors")),
        600,
        proc,
        "the converted weights being written",
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    target = models / default_model.path.name
    assert not (target / "config.json").exists()  # no half checkpoint where the cache looks

    again = subprocess.run(
        [str(BIN / "llm-models"), "path", "default"], capture_output=True, text=True, timeout=900, env=env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == str(target)
    assert sorted(p.name for p in models.iterdir()) == [f".{target.name}.lock", target.name]  # nothing stale
    assert file_sha256(target / "model.safetensors", use_cache=False) == file_sha256(
        default_model.path / "model.safetensors"
    )
