"""The Train tab's form as a typed object, and the `llm-train` YAML it becomes.

The form holds what people change between runs (stage, LoRA rank/alpha/target, learning rate, epochs or
max steps, batch size, cutoff length, validation split) with `llm-train`'s own defaults; an "advanced"
YAML box adds any other LLaMA-Factory key. The base model, dataset and output folder come from the page's
pickers, never from that box, so a run writes only where the server allows.

    cfg = build_config(TrainSettings(stage="sft", max_steps=10), base_model="default",
                       dataset="huangdi_demo", dataset_dir=Path("configs/data/demo"), output_dir=Path("saves/demo"))
    text = config_yaml(cfg)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.config import TrainConfig

# Keys the page sets from its pickers; the advanced box may not override them.
PAGE_KEYS = ("model_name_or_path", "stage", "finetuning_type", "dataset", "dataset_dir", "output_dir")
# LLaMA-Factory keys that read or write files and folders: a page run touches only the folders it was given.
PATH_KEYS = (
    "adapter_name_or_path",
    "cache_dir",
    "deepspeed",
    "export_dir",
    "hub_model_id",
    "logging_dir",
    "media_dir",
    "push_to_hub",
    "ref_model",
    "resume_from_checkpoint",
    "reward_model",
    "tokenized_path",
)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEADER = "# Written by llm-serve's Train tab. Run again with: llm-train {path}\n"

_D = TrainConfig.model_fields


class SettingsError(ValueError):
    """A setting of the form is invalid; the message names it and says what to do."""


class TrainSettings(BaseModel):
    """The form's values; defaults are llm-train's CPU-sane ones."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["sft", "dpo", "kto"] = Field("sft", description=_D["stage"].description)
    lora_rank: int = Field(_D["lora_rank"].default, gt=0, description=_D["lora_rank"].description)
    lora_alpha: int | None = Field(None, gt=0, description=_D["lora_alpha"].description)
    lora_target: str = Field(
        _D["lora_target"].default, min_length=1, description=_D["lora_target"].description
    )
    learning_rate: float = Field(
        _D["learning_rate"].default, gt=0, description=_D["learning_rate"].description
    )
    num_train_epochs: float = Field(
        _D["num_train_epochs"].default, gt=0, description=_D["num_train_epochs"].description
    )
    max_steps: int = Field(_D["max_steps"].default, ge=-1, description=_D["max_steps"].description)
    per_device_train_batch_size: int = Field(
        _D["per_device_train_batch_size"].default,
        gt=0,
        description=_D["per_device_train_batch_size"].description,
    )
    cutoff_len: int = Field(_D["cutoff_len"].default, gt=0, description=_D["cutoff_len"].description)
    val_size: float = Field(_D["val_size"].default, ge=0, description=_D["val_size"].description)
    advanced: str = Field(
        "", description="YAML mapping of further LLaMA-Factory keys (e.g. warmup_ratio: 0.1)"
    )

    def advanced_keys(self) -> dict[str, Any]:
        """The advanced box as a mapping; raises SettingsError for bad YAML or keys the page owns."""
        if not self.advanced.strip():
            return {}
        try:
            data = yaml.safe_load(self.advanced)
        except yaml.YAMLError as exc:
            raise SettingsError(f"advanced settings: not valid YAML ({exc})") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise SettingsError("advanced settings: expected `key: value` lines (a YAML mapping)")
        owned = sorted(k for k in data if k in PAGE_KEYS)
        if owned:
            raise SettingsError(
                f"advanced settings: {', '.join(owned)} are set by the page (base, stage, dataset and output "
                "pickers); remove them from the box"
            )
        paths = sorted(k for k in data if k in PATH_KEYS)
        if paths:
            raise SettingsError(
                f"advanced settings: {', '.join(paths)} name files or folders, which runs started from the page "
                "may not choose; save the YAML and run it with llm-train instead"
            )
        return data


def form_settings(**values: Any) -> TrainSettings:
    """Settings from the form's raw values (numbers arrive as floats or None); errors name the field."""
    cleaned = {k: v for k, v in values.items() if v is not None and v != ""}
    for key in ("lora_rank", "lora_alpha", "max_steps", "per_device_train_batch_size", "cutoff_len"):
        if isinstance(cleaned.get(key), float) and cleaned[key].is_integer():
            cleaned[key] = int(cleaned[key])
    if cleaned.get("lora_alpha") == 0:  # 0 in the form means "the default, 2 x rank"
        cleaned.pop("lora_alpha")
    if cleaned.get("max_steps") == 0:
        cleaned["max_steps"] = -1
    try:
        return TrainSettings(**cleaned)
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from exc


def check_name(name: str) -> str:
    """An output name: one folder level of letters, digits, `.`, `_` or `-`."""
    name = (name or "").strip()
    if not NAME.match(name) or name in (".", ".."):
        raise SettingsError(
            f"output name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def build_config(
    settings: TrainSettings, *, base_model: str, dataset: str, dataset_dir: Path, output_dir: Path
) -> dict[str, Any]:
    """The llm-train config for one run; checked by `TrainConfig` (errors name the key)."""
    cfg: dict[str, Any] = {
        "model_name_or_path": base_model,
        "stage": settings.stage,
        "finetuning_type": "lora",
        "dataset": dataset,
        "dataset_dir": str(dataset_dir),
        "lora_rank": settings.lora_rank,
        "lora_target": settings.lora_target,
        "learning_rate": settings.learning_rate,
        "num_train_epochs": settings.num_train_epochs,
        "max_steps": settings.max_steps,
        "per_device_train_batch_size": settings.per_device_train_batch_size,
        "cutoff_len": settings.cutoff_len,
    }
    if settings.lora_alpha is not None:
        cfg["lora_alpha"] = settings.lora_alpha
    if settings.val_size:
        cfg["val_size"] = settings.val_size
    cfg.update(settings.advanced_keys())
    cfg["output_dir"] = str(output_dir)
    try:
        TrainConfig.model_validate(cfg)
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from exc
    return cfg


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    """The typed config of a built mapping (what llm-train will load)."""
    return TrainConfig.model_validate(cfg)


def config_yaml(cfg: dict[str, Any], path: Path | None = None) -> str:
    """The YAML llm-train gets, with a header saying how to run it again."""
    header = HEADER.format(path=path or "THIS_FILE.yaml")
    return header + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False)


def save_config(cfg: dict[str, Any], configs_dir: Path, name: str) -> Path:
    """Write `configs_dir/NAME.yaml`; a file this page did not write is never replaced."""
    path = configs_dir / f"{check_name(name)}.yaml"
    if path.exists() and not path.read_text(encoding="utf-8").startswith(HEADER.split("{")[0]):
        raise SettingsError(f"{path} exists and was not written by this page; choose another output name")
    configs_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config_yaml(cfg, path), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _explain(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
