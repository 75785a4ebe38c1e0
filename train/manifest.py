"""`run_manifest.json`: what an adapter was trained from, so serve and eval can check they match.

Holds the base model (name, resolved path, sha256 of its weights), the template, each dataset's file
and sha256, the stage, the hyper-parameters LLaMA-Factory got, final metrics (tokens/s of this
session after a `--resume`; PPO's rewards), package versions, and how the run was spread (world size,
per-device batch, gradient accumulation, effective batch).
Checksums of large files are cached in `$LLM_SERVE_HOME/sha256-cache.json` by path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from serve.atomic import write_json_atomic

MANIFEST = "run_manifest.json"
PACKAGES = ("llm-serve", "llamafactory", "torch", "transformers", "peft", "trl", "accelerate", "datasets")


def _cache_path() -> Path:
    from serve.models import llm_serve_home

    return llm_serve_home() / "sha256-cache.json"


def file_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 of a file; for big files the digest is cached under the file's path, size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _cache_path()
    cache: dict[str, str] = {}
    if use_cache and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}
        if key in cache:
            return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if use_cache and st.st_size > (1 << 20):
        cache[key] = value
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_file, cache)
        except OSError:
            pass  # a read-only cache dir only costs a re-hash next time
    return value


def model_sha256(model_dir: Path) -> str:
    """sha256 of `model.safetensors`, or of the sorted per-shard digests for sharded checkpoints."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return file_sha256(single)
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        return ""
    return hashlib.sha256("".join(file_sha256(s) for s in shards).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def read_metrics(run_dir: Path, *, tokens_before: int = 0) -> dict[str, Any]:
    """Final metrics LLaMA-Factory wrote (all_results.json), plus throughput and rewards from the trainer log.

    `tokens_before` is the token count of the checkpoint a `--resume` started from: the trainer's
    count runs on across the resume but its runtime covers only this session, so tokens/s is
    computed over this session's tokens alone."""
    metrics: dict[str, Any] = {}
    results = run_dir / "all_results.json"
    if results.is_file():
        metrics.update(json.loads(results.read_text()))
    log = read_trainer_log(run_dir)
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


def read_trainer_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trainer_log.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


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
) -> dict[str, Any]:
    """The manifest as a dict. `parallel` is `parallel_layout(...)`; `resumed` is
    `{"checkpoint": NAME, "tokens_before": N}` for a `--resume`d run; `stage_info` holds what the stage
    used beyond the base and datasets (PPO's reward model, DeepSpeed) and the launch's wall time."""
    metrics = read_metrics(run_dir, tokens_before=(resumed or {}).get("tokens_before", 0))
    info = dict(stage_info or {})
    if "wall_seconds" in info:
        metrics["wall_seconds"] = info.pop("wall_seconds")
    manifest = {
        "schema_version": 1,
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
        "packages": package_versions(),
        "command": command,
        "parallel": parallel or parallel_layout(1, 1, config, None),
    }
    if resumed:
        manifest["resumed"] = resumed
    manifest.update(info)
    return manifest


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
