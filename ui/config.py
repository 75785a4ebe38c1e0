"""Typed settings for the chat page (`llm-ui`): defaults < `--config YAML` < command-line flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serve.config import load_settings


class UIConfigError(ValueError):
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

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("LLM_SERVE_API_KEY") or None


def load_config(path: str | Path | None, overrides: dict) -> UIConfig:
    """Merge YAML (if any) with explicit overrides (None means not given) and validate."""
    return load_settings(UIConfig, path, overrides, error=UIConfigError)
