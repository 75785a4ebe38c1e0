"""Typed settings for the chat page (`llm-ui`): defaults < `--config YAML` < command-line flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.settings import SettingsError, load_settings


class UIConfigError(SettingsError):
    """A setting is invalid; the message names the setting and the file it came from."""


class UIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        "http://127.0.0.1:8000",
        description="OpenAI-compatible server, with or without /v1 (llm-serve, vLLM, ...).",
    )
    api_key: str | None = Field(None, description="Bearer key for the server (env LLM_SERVE_API_KEY).")
    feedback_dir: Path = Field(
        Path("feedback"), description="Folder for kto.jsonl, dpo.jsonl and their dataset_info.json."
    )
    host: str = Field("127.0.0.1", description="Interface the page listens on.")
    port: int = Field(7860, ge=0, le=65535, description="TCP port of the page.")
    temperature: float = Field(0.7, ge=0, le=2, description="Initial temperature control.")
    top_p: float = Field(1.0, gt=0, le=1, description="Initial top_p control.")
    max_tokens: int = Field(256, ge=1, le=4096, description="Initial max_tokens control.")
    ui_train: bool = Field(
        False,
        description="Add the Train tab: llm-train runs on this machine into --adapter-dir, and the finished "
        "adapter is loaded into the server (which must serve that folder or allow runtime LoRA loading).",
    )
    adapter_dirs: list[Path] = Field(
        default_factory=list, description="Folders the Train tab's runs write adapters into (repeatable)."
    )
    dataset_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders with a dataset_info.json the Train tab offers, besides the feedback folder and "
        "the demo data (repeatable).",
    )

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("LLM_SERVE_API_KEY") or None

    @model_validator(mode="after")
    def _train_needs_somewhere_to_write(self) -> UIConfig:
        if self.ui_train:
            check_train_settings(self.adapter_dirs, self.host, self.resolved_api_key())
        return self


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_train_settings(adapter_dirs: list, host: str, api_key: str | None) -> None:
    """What the Train tab needs, for llm-ui and llm-serve alike (raises ValueError naming the flag)."""
    if not adapter_dirs:
        raise ValueError("ui_train needs --adapter-dir DIR: the folder training runs write adapters into")
    if host not in LOOPBACK and not api_key:
        raise ValueError(
            f"ui_train on {host} (beyond loopback) needs --api-key: anyone reaching the page could start "
            "training runs; the page then asks for the key"
        )


def load_config(path: str | Path | None, overrides: dict) -> UIConfig:
    """Merge YAML (if any) with explicit overrides (None means not given) and validate."""
    return load_settings(UIConfig, path, overrides, error=UIConfigError, prog="llm-ui")
