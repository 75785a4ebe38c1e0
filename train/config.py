"""The typed `llm-train` configuration: LLaMA-Factory's YAML keys plus our defaults and checks.

A config is a LLaMA-Factory training YAML. Keys this model names are typed and checked before
anything heavy loads; every other key must be one of LLaMA-Factory's own arguments and passes through
to it unchanged (a misspelt key is refused here, naming the closest one, instead of failing later in
LLaMA-Factory). Precedence: `key=value` on the command line over the YAML over these defaults.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve.cli_runner import UserError
from serve.settings import describe_validation_error, read_yaml_mapping

Stage = Literal["sft", "pt", "dpo", "kto", "rm", "ppo"]


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key and what to do."""

    exit_code = 1


class ConfigFileError(ConfigError):
    """The YAML file or a key=value override is wrong (found before anything else runs)."""

    exit_code = 2


class TrainConfig(BaseModel):
    """One training run. Unknown keys are LLaMA-Factory arguments and are passed through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model_name_or_path: str = Field(
        "default", description="`default`, a local HF checkpoint dir or a .gguf file"
    )
    stage: Stage = Field(
        "sft",
        description="training stage: sft, pt (pre-training), dpo, kto, rm (reward model) or ppo (needs reward_model)",
    )
    finetuning_type: Literal["lora", "full", "freeze"] = Field("lora", description="what is trained")
    dataset: str = Field(..., description="comma-separated dataset names from dataset_dir/dataset_info.json")
    dataset_dir: str = Field(
        "data", description="directory holding dataset_info.json, relative to the config file"
    )
    eval_dataset: str | None = Field(
        None, description="datasets for evaluation during training (instead of val_size)"
    )
    val_size: float = Field(
        0.0, ge=0, description="held-out share (<1) or row count (>=1) of dataset for eval"
    )
    eval_steps: int | None = Field(
        None, gt=0, description="evaluate every N steps (default: 5 evaluations per run)"
    )
    early_stopping_steps: int | None = Field(
        None,
        gt=0,
        description="stop after N evaluations without a lower eval loss (needs val_size or eval_dataset)",
    )
    template: str | None = Field(
        None, description="LLaMA-Factory chat template; default: the one matching the model"
    )
    default_system: str | None = Field(None, description="system prompt used when a row has none")
    output_dir: str = Field(..., description="where the adapter (or full model) and run_manifest.json end up")
    cutoff_len: int = Field(1024, gt=0, description="truncate samples to this many tokens")
    max_samples: int | None = Field(None, gt=0, description="use at most this many rows per dataset")
    per_device_train_batch_size: int = Field(4, gt=0, description="samples per step and device")
    gradient_accumulation_steps: int = Field(1, gt=0, description="steps accumulated per optimizer update")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    num_train_epochs: float = Field(3.0, gt=0, description="epochs over the data (max_steps wins when set)")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: use num_train_epochs)")
    lr_scheduler_type: str = Field("cosine", description="learning-rate schedule")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="share of steps spent warming up")
    lora_rank: int = Field(8, gt=0, description="LoRA rank")
    lora_alpha: int | None = Field(None, gt=0, description="LoRA alpha (default: 2 * lora_rank)")
    lora_target: str = Field("all", description="modules LoRA adapts: `all` or comma-separated names")
    logging_steps: int = Field(1, gt=0, description="log loss every N steps (the progress bar reads these)")
    save_steps: int = Field(50, gt=0, description="save a resumable checkpoint every N steps")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept while training")
    seed: int = Field(42, description="random seed")
    quantization_bit: int | None = Field(None, description="QLoRA: 4 or 8 (needs a CUDA GPU)")
    bf16: bool = Field(False, description="bfloat16 training (GPU only: emulated and ~6x slower on CPU)")
    fp16: bool = Field(False, description="float16 mixed precision (GPU only)")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON (set by --deepspeed)")
    reward_model: str | None = Field(
        None,
        description="ppo: directory of a reward model from `llm-train` stage rm (or an http URL with type api)",
    )
    reward_model_type: Literal["lora", "full", "api"] | None = Field(
        None, description="ppo: lora or full (default: what reward_model holds), or api for a reward server"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        unknown = sorted(set(self.extra_keys()) - llamafactory_keys()) if llamafactory_keys() else []
        if unknown:
            known = set(type(self).model_fields) | llamafactory_keys()
            hints = [
                f"{k!r}"
                + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                for k in unknown
            ]
            raise ValueError(
                f"unknown key {', '.join(hints)}: neither llm-train nor LLaMA-Factory has it; fix the spelling "
                "(LLaMA-Factory's keys: llamafactory-cli train -h)"
            )
        if self.early_stopping_steps and not (self.val_size or self.eval_dataset):
            raise ValueError(
                "early_stopping_steps needs an evaluation set: set val_size (e.g. 0.1) or eval_dataset"
            )
        if self.val_size and self.eval_dataset:
            raise ValueError("give either val_size or eval_dataset, not both")
        if self.stage == "ppo" and self.does_eval:
            raise ValueError("stage ppo cannot evaluate during training: remove val_size/eval_dataset")
        if self.stage in ("rm", "ppo") and self.early_stopping_steps:
            raise ValueError(f"stage {self.stage} does not support early_stopping_steps (LLaMA-Factory)")
        if self.stage != "ppo" and (self.reward_model or self.reward_model_type):
            raise ValueError("reward_model/reward_model_type only apply to stage: ppo")
        if self.quantization_bit is not None and self.finetuning_type != "lora":
            raise ValueError("quantization_bit (QLoRA) only works with finetuning_type: lora")
        return self

    @property
    def does_eval(self) -> bool:
        return bool(self.val_size or self.eval_dataset)

    def dataset_names(self, which: str = "dataset") -> list[str]:
        value = getattr(self, which) or ""
        return [n.strip() for n in value.split(",") if n.strip()]

    def extra_keys(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


@functools.cache
def llamafactory_keys() -> frozenset[str]:
    """Every argument name LLaMA-Factory's `train` accepts (empty when it is not installed).

    Read from the source of its argument dataclasses and transformers' TrainingArguments with `ast`,
    not by importing them: that import takes 7-20 s, this 0.2 s. A superset (a few internal names
    too) is fine: it only has to catch misspellings.
    """
    lf = importlib.util.find_spec("llamafactory")
    tf = importlib.util.find_spec("transformers")
    if lf is None or tf is None or not lf.submodule_search_locations or not tf.submodule_search_locations:
        return frozenset()
    hparams = Path(next(iter(lf.submodule_search_locations))) / "hparams"
    tf_dir = Path(next(iter(tf.submodule_search_locations)))
    names: set[str] = set()
    for file in [
        *sorted(hparams.glob("*_args.py")),
        tf_dir / "training_args.py",
        tf_dir / "training_args_seq2seq.py",
    ]:
        if not file.is_file():
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names |= {
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                }
    return frozenset(names)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (`3` is an int, `true` a bool, `a,b` a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigFileError(f"override {text!r} must look like key=value, e.g. max_steps=10")
    return key.strip(), yaml.safe_load(value) if value else None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides and check it; raises ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"config {path} not found; the examples are in configs/train/")
    raw = read_yaml_mapping(path, ConfigFileError)
    for text in overrides or []:
        key, value = parse_override(text)
        raw[key] = value
    # A relative dataset_dir is looked up next to the config file first (configs work from any working
    # directory), then in the working directory as LLaMA-Factory does.
    dataset_dir = Path(str(raw.get("dataset_dir", "data"))).expanduser()
    if not dataset_dir.is_absolute() and (path.parent / dataset_dir).is_dir():
        raw["dataset_dir"] = str(path.parent / dataset_dir)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigFileError(describe_validation_error(exc, TrainConfig, path=path)) from exc
