"""`llm-eval`'s typed configuration, validated before any model loads.

Precedence: CLI flags > `--config FILE.yaml` > the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def default_cache_dir() -> Path:
    from serve.models import llm_serve_home

    return llm_serve_home() / "eval-cache"


class EvalConfig(BaseModel):
    """Everything one `llm-eval` run needs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "default",
        description="Base model: `default`, an HF checkpoint dir or .gguf; with --base-url the served base id.",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="`[NAME=]PATH` PEFT adapters (with --base-url: served adapter names).",
    )
    base_url: str | None = Field(
        None, description="Score models on this OpenAI-compatible server instead of loading them."
    )
    api_key: str | None = Field(None, description="Bearer key for --base-url.")
    tokenizer: str | None = Field(
        None, description="Local tokenizer for server log-likelihood tasks when the server has no /tokenize."
    )
    data: Path | None = Field(
        None, description="Style reference set (alpaca, sharegpt or OpenAI messages; JSON or JSONL)."
    )
    tasks: list[str] = Field(default_factory=list, description="lm-eval task or group names.")
    include_paths: list[Path] = Field(
        default_factory=list, description="Directories of extra lm-eval task YAMLs."
    )
    suite: str | None = Field(
        None, description="A shipped suite name (eval/suites/NAME.yaml) or a suite YAML path."
    )
    limit: int | None = Field(
        None, ge=1, description="At most this many samples per task and reference prompts."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per task (task default when unset)."
    )
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: generation tasks use the chat template, log-likelihood tasks do not."
    )
    out: Path = Field(
        Path("artifacts/eval/latest"),
        description="Output directory (refused if non-empty without --overwrite).",
    )
    overwrite: bool = Field(False, description="Replace a non-empty --out.")
    seed: int = Field(0, description="Seed for lm-eval, sampling, the classifier's folds and the bootstraps.")
    max_tokens: int = Field(128, ge=1, description="Most new tokens per style reply.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Style reply temperature (0 = greedy).")
    batch_size: int = Field(8, ge=1, description="Local batch size (lm-eval and style generation).")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads for local targets (default: torch's; 1 is far faster on a busy CPU).",
    )
    concurrency: int = Field(4, ge=1, description="Requests in flight against --base-url.")
    embeddings: bool = Field(True, description="Score embedding similarity (all-MiniLM-L6-v2; English).")
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Where generations and lm-eval responses are cached."
    )
    no_cache: bool = Field(False, description="Neither read nor write the cache.")
    allow_base_mismatch: bool = Field(
        False, description="Score adapters whose recorded base differs from --model."
    )
    reward_model: Path | None = Field(
        None,
        description="Score every style reply with this reward model (an `llm-train` stage rm output); needs --data.",
    )
    judge_url: str | None = Field(
        None, description="OpenAI-compatible server for the pairwise LLM judge (off when unset)."
    )
    judge_model: str | None = Field(None, description="Model id of the judge on --judge-url.")
    judge_api_key: str | None = Field(None, description="Bearer key for --judge-url.")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not (self.suite or self.tasks or self.data):
            raise ValueError("nothing to evaluate: give --suite NAME, --tasks T1,T2 and/or --data FILE")
        if self.judge_url and not self.judge_model:
            raise ValueError("--judge-url needs --judge-model (the judge's model id on that server)")
        if self.reward_model and not self.data:
            raise ValueError(
                "--reward-model scores style replies, so it needs --data (the prompts to answer)"
            )
        if self.judge_url and not self.data:
            raise ValueError("--judge-url compares style replies, so it needs --data")
        return self
