"""The typed configuration of one export run, validated before any weights load.

`llm-export` flags fill `ExportConfig`; library callers (tests, `make demo`) build it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")


class ExportConfig(BaseModel):
    """What to merge, where to write it and which extra artefacts to produce."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters as `[NAME=]PATH`, applied in the order given (each is merged on top).",
    )
    model: str | None = Field(
        default=None,
        description="A full checkpoint to export as it is (full or freeze fine-tuning output), instead of adapters.",
    )
    out: Path = Field(description="Output directory for the merged checkpoint, GGUF files and report.")
    base: str | None = Field(
        default=None,
        description="Base model (`default`, a checkpoint dir or .gguf); default: the adapters' recorded base.",
    )
    gguf: list[GGUFType] = Field(
        default_factory=list, description="GGUF files to write next to the merged checkpoint, one per type."
    )
    modelfile: bool = Field(default=False, description="Also write an Ollama Modelfile next to the GGUF.")
    overwrite: bool = Field(default=False, description="Replace an existing non-empty output directory.")
    max_new_tokens: int = Field(
        default=16, ge=1, le=256, description="Greedy tokens generated per verification prompt."
    )
    max_shard_size: str = Field(default="2GB", description="Largest safetensors shard of the merged model.")

    @model_validator(mode="after")
    def _what(self) -> ExportConfig:
        if bool(self.adapters) == bool(self.model):
            raise ValueError(
                "give --adapter (LoRA adapters to merge) or --model (a full checkpoint), not both"
            )
        if self.model and self.base:
            raise ValueError("--base only applies to --adapter exports; --model is exported as it is")
        return self
