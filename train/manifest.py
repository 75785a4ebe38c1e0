"""`run_manifest.json`: what an adapter was trained from, so serve and eval can check they match.

Holds the base model (name, resolved path, sha256 of its weights), the template, each dataset's file
and sha256, the stage, the hyper-parameters LLaMA-Factory got, final metrics and package versions.
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


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """Final metrics LLaMA-Factory wrote (all_results.json), plus token throughput from the trainer log."""
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
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    if evals:
        metrics["best_eval_loss"] = min(evals)
    tokens = metrics.get("num_input_tokens_seen") or metrics.get("tokens")
    if tokens and metrics.get("train_runtime"):
        metrics["tokens_per_second"] = round(tokens / metrics["train_runtime"], 2)
    return metrics


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
) -> dict[str, Any]:
    return {
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
        "metrics": read_metrics(run_dir),
        "packages": package_versions(),
        "command": command,
    }
