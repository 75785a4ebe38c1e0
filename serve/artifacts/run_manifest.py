"""`run_manifest.json`: what an llm-train run was made from, typed and versioned.

Written once by `llm-train` (train/manifest.py fills it) into the adapter or model folder it produces;
read by `llm-serve` (the adapter's base must be the served one), `llm-export` (the base to merge on,
its sha256, the run's system prompt), `llm-eval` and `llm-models list`. Nothing else writes it.

    manifest = read_manifest(Path("saves/demo"))     # None when the folder has none
    manifest.base_model.name, manifest.template.default_system, manifest.metrics["final_loss"]

Versions: `schema_version` is SCHEMA_VERSION when written. A manifest of an older version is read
(upgraded in `_UPGRADES` when a layout changes); one from a newer llm-serve is refused with what to do.
To add a field, give it a default, so manifests written before it still read, and keep the version;
bump it (and add an upgrade) only when an existing field changes meaning or shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.atomic import write_json_atomic
from serve.cli_runner import UserError

MANIFEST_FILE = "run_manifest.json"
SCHEMA_VERSION = 1

# schema_version N -> a function turning an N layout into the N+1 layout (none yet: 1 is the first).
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class ManifestError(UserError, ValueError):
    """A run_manifest.json cannot be read; the message names the file and what to do."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelRecord(_Record):
    """The base model the run trained on."""

    name: str = Field(description="what the config named: `default`, a path or a hub-style name")
    path: str = Field("", description="the resolved local checkpoint folder")
    sha256: str = Field("", description="sha256 of its weights (serve.artifacts.provenance.model_sha256)")


class ToolsRecord(_Record):
    """How the run's template wrote tools (LLaMA-Factory's tool format), so serving writes them the same way."""

    format: str = Field(description="LLaMA-Factory's tool format, e.g. default, glm4, llama3, qwen")
    default_system: str | None = Field(None, description="the template's system text for tool turns")


class TemplateRecord(_Record):
    """The chat template the run trained with (LLaMA-Factory's name and how it relates to the tokenizer's)."""

    name: str | None = Field(None, description="LLaMA-Factory template name")
    default_system: str | None = Field(None, description="system prompt used for rows without one")
    matches_tokenizer: bool = Field(True, description="renders the same ids as the tokenizer's template")
    keeps_tokenizer_template: bool | None = Field(
        None, description="LLaMA-Factory kept the tokenizer's own chat template when saving"
    )
    chat_template_sha256: str | None = Field(None, description="sha256 of the base tokenizer's template")
    saved_with_adapter: bool | None = Field(None, description="the output folder ships a chat template")
    saved_matches_base: bool | None = Field(None, description="that template is the base tokenizer's")
    tools: ToolsRecord | None = Field(None, description="how tools were written in training (serve.tools)")


class DatasetRecord(_Record):
    """One dataset the run read."""

    name: str
    split: Literal["train", "eval"] = "train"
    file: str = Field("", description="the resolved data file")
    sha256: str = ""
    format: str = Field("", description="alpaca, sharegpt, openai, dpo, kto or pt")
    rows: int = 0


class ParallelLayout(_Record):
    """How the run was spread over processes and what batch each optimizer step saw."""

    world_size: int = 1
    nnodes: int = 1
    nproc_per_node: int = 1
    backend: str | None = Field(None, description="gloo, nccl or deepspeed/...; None for one process")
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    effective_batch_size: int = Field(1, description="per-device batch x accumulation x world size")


class ResumedRecord(_Record):
    """The checkpoint a `--resume` started from."""

    checkpoint: str
    tokens_before: int = Field(0, description="tokens the trainer had seen at that checkpoint")


class RewardModelRecord(_Record):
    """PPO's reward model."""

    path: str
    type: str = Field(description="lora, full or api")
    stage: str | None = None
    value_head_sha256: str | None = None


class DeepSpeedRecord(_Record):
    """The DeepSpeed config a run used."""

    config: str
    dir: str = ""


class RunManifest(_Record):
    """One training run: inputs, settings, results and the software that ran it."""

    schema_version: int = SCHEMA_VERSION
    created_at: str = Field("", description="local time the run finished, ISO 8601")
    output_dir: str = Field("", description="where the run was published")
    base_model: BaseModelRecord
    stage: str | None = Field(None, description="sft, pt, dpo, kto or rm")
    finetuning_type: str | None = Field(None, description="lora, full or freeze")
    template: TemplateRecord = Field(default_factory=TemplateRecord)
    datasets: list[DatasetRecord] = Field(default_factory=list)
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="the arguments LLaMA-Factory got (less output and resume paths)"
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="LLaMA-Factory's all_results.json plus final/best loss, tokens/s"
    )
    packages: dict[str, str] = Field(default_factory=dict, description="versions of the packages that ran it")
    command: list[str] = Field(default_factory=list, description="the llm-train command line")
    parallel: ParallelLayout | None = Field(
        None, description="processes and batch (None before it was recorded)"
    )
    resumed: ResumedRecord | None = Field(None, description="set when the run was resumed from a checkpoint")
    reward_model: RewardModelRecord | None = Field(None, description="stage ppo: the reward model")
    deepspeed: DeepSpeedRecord | None = Field(None, description="set when DeepSpeed ran it")


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_FILE


def write_manifest(folder: str | Path, manifest: RunManifest) -> Path:
    """Write `folder/run_manifest.json` atomically."""
    path = manifest_path(folder)
    write_json_atomic(
        path, manifest.model_dump(mode="json", exclude_none=True)
    )  # unset optional records left out
    return path


def read_manifest(folder: str | Path) -> RunManifest | None:
    """The manifest in `folder`, None when it has none; raises ManifestError when it cannot be read."""
    path = manifest_path(folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(
            f"{path} is not readable JSON ({exc}); restore it or remove it (the base-model checks then "
            "use adapter_config.json only)"
        ) from exc
    return parse_manifest(data, source=path)


def parse_manifest(data: Any, source: str | Path = MANIFEST_FILE) -> RunManifest:
    """Validate manifest JSON, upgrading an older layout; raises ManifestError naming `source`."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"{source}: schema_version {version!r} is not a version llm-serve wrote")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{source} has schema_version {version}, written by a newer llm-serve; this one reads up to "
            f"{SCHEMA_VERSION}: upgrade llm-serve to use this folder"
        )
    while version < SCHEMA_VERSION:
        data = _UPGRADES[version](data)
        version += 1
    try:
        return RunManifest.model_validate({**data, "schema_version": SCHEMA_VERSION})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ManifestError(f"{source}: not a run manifest llm-serve understands ({problems})") from exc
