"""How `llm-train` fills the run manifest (serve.artifacts.run_manifest) of the folder it publishes.

Records the base model (name, resolved path, sha256 of its weights), the template, each dataset's file
and sha256, the stage, the hyper-parameters LLaMA-Factory got, final metrics (LLaMA-Factory's
all_results.json plus loss, throughput (of this session after a `--resume`) and PPO's rewards from
its trainer log), package versions, and how the run was spread (world size, per-device batch,
gradient accumulation, effective batch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from serve.artifacts.provenance import model_sha256, package_versions
from serve.artifacts.run_manifest import RunManifest
from serve.artifacts.trainer_log import read_trainer_log

PACKAGES = ("llm-serve", "llamafactory", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


def read_metrics(run_dir: Path, *, tokens_before: int = 0) -> dict[str, Any]:
    """Final metrics LLaMA-Factory wrote (all_results.json), plus throughput and rewards from the trainer log.

    `tokens_before` is the token count of the checkpoint a `--resume` started from: the trainer's
    count runs on across the resume but its runtime covers only this session, so tokens/s is
    computed over this session's tokens alone."""
    metrics: dict[str, Any] = {}
    results = run_dir / "all_results.json"
    if results.is_file():
        metrics.update(json.loads(results.read_text()))
    log = read_trainer_log(run_dir, state_fallback=False)
    train_rows = [r for r in log if "loss" in r]
    if train_rows:
        last = train_rows[-1]
        metrics["final_loss"] = last["loss"]
        metrics["steps"] = last.get("current_steps")
        if "total_tokens" in last:
            metrics["tokens"] = last["total_tokens"]
    rewards = [r["reward"] for r in log if "reward" in r]
    if rewards:  # PPO: the mean reward of each logged step's rollouts
        metrics["rewards"] = rewards
        metrics["final_reward"] = rewards[-1]
    if "train_runtime" not in metrics and log and log[-1].get("elapsed_time"):
        # PPO's trainer writes no all_results.json; its log rows carry the elapsed time (H:MM:SS).
        h, m, sec = (int(x) for x in str(log[-1]["elapsed_time"]).split(":")[-3:])
        metrics["train_runtime"] = float(h * 3600 + m * 60 + sec)
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    if evals:
        metrics["best_eval_loss"] = min(evals)
    tokens = metrics.get("num_input_tokens_seen") or metrics.get("tokens")
    if tokens and metrics.get("train_runtime"):
        session = tokens - tokens_before
        if tokens_before:
            metrics["tokens_this_session"] = session
        metrics["tokens_per_second"] = round(session / metrics["train_runtime"], 2)
    return metrics


def checkpoint_tokens(checkpoint: Path | None) -> int:
    """Tokens the trainer had seen when it saved `checkpoint` (0 when unknown)."""
    if checkpoint is None:
        return 0
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return int(state.get("num_input_tokens_seen") or 0)


def build_manifest(
    *,
    base_name: str,
    base_path: Path,
    template: dict[str, Any],
    datasets: list[dict[str, Any]],
    config: dict[str, Any],
    lf_args: dict[str, Any],
    run_dir: Path,
    output_dir: Path,
    command: list[str],
    parallel: dict[str, Any] | None = None,
    resumed: dict[str, Any] | None = None,
    stage_info: dict[str, Any] | None = None,
) -> RunManifest:
    """The run's manifest. `parallel` is `parallel_layout(...)`; `resumed` is
    `{"checkpoint": NAME, "tokens_before": N}` for a `--resume`d run; `stage_info` holds what the stage
    used beyond the base and datasets (PPO's reward model, DeepSpeed) and the launch's wall time."""
    metrics = read_metrics(run_dir, tokens_before=(resumed or {}).get("tokens_before", 0))
    info = dict(stage_info or {})
    if "wall_seconds" in info:
        metrics["wall_seconds"] = info.pop("wall_seconds")
    manifest = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "output_dir": str(output_dir),
        "base_model": {"name": base_name, "path": str(base_path), "sha256": model_sha256(base_path)},
        "stage": config.get("stage"),
        "finetuning_type": config.get("finetuning_type"),
        "template": template,
        "datasets": datasets,
        "hyperparameters": {
            k: v for k, v in lf_args.items() if k not in ("output_dir", "resume_from_checkpoint")
        },
        "metrics": metrics,
        "packages": package_versions(PACKAGES),
        "command": command,
        "parallel": parallel or parallel_layout(1, 1, config, None),
    }
    if resumed:
        manifest["resumed"] = resumed
    manifest.update(info)
    return RunManifest.model_validate(manifest)


def parallel_layout(
    nnodes: int, nproc_per_node: int, config: dict[str, Any], backend: str | None
) -> dict[str, Any]:
    """How the run was spread: world size and the batch each optimizer step saw."""
    per_device = int(config.get("per_device_train_batch_size", 1))
    accumulation = int(config.get("gradient_accumulation_steps", 1))
    world = nnodes * nproc_per_node
    return {
        "world_size": world,
        "nnodes": nnodes,
        "nproc_per_node": nproc_per_node,
        "backend": backend,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": per_device * accumulation * world,
    }
