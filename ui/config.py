"""Typed settings for the chat page (`llm-ui`): defaults < `--config YAML` < command-line flags."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


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
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UIConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UIConfigError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise UIConfigError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return UIConfig(**data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UIConfigError(f"invalid setting{where}: {msgs}") from exc
