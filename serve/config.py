"""Typed settings for `llm-serve`: defaults < `--config YAML` < command-line flags (serve.settings).

Cheap checks run here, before any weights load (vLLM's "validate before loading" discipline). The
serving defaults both engines share live here too: the context cap and what `dtype: auto` means.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.settings import SettingsError, load_settings

#: Context cap when --max-model-len is not given (both engines; never beyond the model's own).
DEFAULT_MAX_MODEL_LEN = 4096

#: LoRA slots when --max-loras is not given (or one per start-up adapter, when there are more).
DEFAULT_MAX_LORAS = 4


def resolve_max_model_len(requested: int | None, model_max: int | None) -> int:
    """--max-model-len, else the model's context capped at DEFAULT_MAX_MODEL_LEN; never beyond the model's."""
    limit = int(model_max or DEFAULT_MAX_MODEL_LEN)
    return min(requested or min(limit, DEFAULT_MAX_MODEL_LEN), limit)


def resolve_dtype(dtype: str, *, on_gpu: bool, engine: str = "hf") -> str:
    """What `dtype: auto` means, for both engines.

    On CPU float32 (bf16 is emulated there, ~6x slower). On GPU the HF engine computes in bfloat16;
    vLLM gets `auto` and applies its own rule (bf16 checkpoints in bf16, fp32/fp16 ones in fp16).
    """
    if dtype != "auto":
        return dtype
    if not on_gpu:
        return "float32"
    return "bfloat16" if engine == "hf" else "auto"


class ConfigError(SettingsError):
    """A setting is invalid; the message names the setting and the file it came from."""


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="`default`, a local HF checkpoint directory or a .gguf file.")
    adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters as `NAME=PATH` or `PATH`; served by name."
    )
    adapter_dirs: list[str] = Field(
        default_factory=list,
        description="Folders whose complete adapters (at any depth) are served by their relative path, "
        "loaded on first request; new ones appear without a restart.",
    )
    allow_runtime_lora: bool = Field(
        False,
        description="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (paths must lie in "
        "an --adapter-dir; behind --api-key when set).",
    )
    max_loras: int | None = Field(
        None, ge=1, le=256,
        description="Adapters held in the batched LoRA weights at once (default: 4, or one per --adapter); "
        "others wait for a slot.",
    )  # fmt: skip
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="Adapters kept read in host memory (default: max_loras); others are read from disk.",
    )
    max_lora_rank: int | None = Field(
        None, ge=1, le=512,
        description="Largest LoRA rank servable; slots are sized for it (default: the largest rank at "
        "start-up, at least 8).",
    )  # fmt: skip
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_key: str | None = Field(
        None, description="Bearer key required on /v1 routes (env LLM_SERVE_API_KEY)."
    )
    served_model_name: str | None = Field(None, description="Id of the base model in /v1/models.")
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt+completion in tokens (default: the model's, capped at 4096)."
    )
    max_num_seqs: int = Field(16, ge=1, le=256, description="Sequences decoded together in one batch.")
    max_queue: int = Field(256, ge=1, description="Requests waiting beyond the running batch before 429.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413).")
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="Memory budget for the KV cache in GiB (default: enough for max_num_seqs)."
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        le=65536,
        description="Most tokens one step carries: the prompt chunk size when nothing decodes. Default: 512 "
        "for our engine (prefill throughput peaks there on a 2-core CPU, and a burst of prompts reaches "
        "its first tokens soonest); vLLM's own default for --engine vllm.",
    )
    step_time_ratio: float = Field(
        2.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Our engine: while sequences decode, a step carrying prompt chunks may take at most this "
        "many times a decode step of the full batch, by the step time measured as the engine runs (bounds "
        "inter-token latency while prompts are admitted); 0: chunks as large as max_num_batched_tokens "
        "allows (the behaviour before issue 19).",
    )
    batch_wait_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="Our engine: before a step in which nothing decodes, wait up to this long for more "
        "requests (a burst arriving, or closed-loop clients such as lm-eval sending their next), so they "
        "share the step; after a step that answered some requests, at most half a step; 0: never wait.",
    )
    prefix_caching: bool = Field(
        True,
        description="Keep finished sequences' keys/values and reuse them for later prompts of the same "
        "adapter that start the same way (chat history, shared documents, lm-eval choices).",
    )
    prefix_cache_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory for the prefix cache in GiB, committed at start-up; the least recently used "
        "prefixes are evicted (default: as much as the KV cache of max_num_seqs sequences, at most 1 GiB).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and compute dtype; auto is float32 on CPU, and on GPU bfloat16 (hf engine) "
        "or vLLM's own choice from the checkpoint (vllm engine).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the HF engine runs.")
    engine: Literal["hf", "vllm", "llama-cpp"] = Field(
        "hf",
        description="hf: llm-serve's own continuous-batching engine (its native decoder for Llama, Mistral "
        "and Qwen2, else transformers' modeling code); vllm: vLLM (needs ./.venv-vllm); llama-cpp: "
        "llama.cpp's llama-server on the model written as GGUF (`make llama-cpp`; CPU, start-up adapters "
        "only, fastest for one adapter at a time).",
    )
    llama_cpp_args: list[str] = Field(
        default_factory=list,
        description="llama-cpp engine: extra llama-server flags, appended after ours (e.g. --poll 0).",
    )
    model_impl: Literal["auto", "native", "transformers"] = Field(
        "auto",
        description="HF engine: run Llama/Mistral/Qwen2 with llm-serve's own decoder (native, faster) or "
        "transformers' modeling code; auto picks native when the model is covered.",
    )
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="HF engine, native decoder, CPU: int8 weight-only attention/MLP projections "
        "(per-channel scales, bf16 activations; adapters stay in float): faster decode, small logit drift. "
        "llama-cpp engine: the GGUF is written as q8_0.",
    )
    allow_base_mismatch: bool = Field(
        False, description="Serve adapters whose recorded base model differs from the served one."
    )
    metrics_need_key: bool = Field(
        False,
        description="Require the API key on /metrics too (Prometheus: `authorization` in the scrape "
        "config); without it /metrics stays open and, when a key is set, labels adapters by hash.",
    )
    ui: bool = Field(False, description="Mount the Gradio chat page at /ui.")
    feedback_dir: str = Field("feedback", description="Where the chat page saves feedback as KTO/DPO data.")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests get on SIGTERM.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # vLLM pass-through (ignored by the HF engine)
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per replica (tensor parallel).")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM: pipeline stages.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM: fraction of GPU memory.")
    enforce_eager: bool = Field(False, description="vLLM: skip CUDA graphs / compilation.")

    @field_validator("step_time_ratio")
    @classmethod
    def _ratio_off_or_at_least_one(cls, v: float) -> float:
        if v != 0 and v < 1:
            raise ValueError(
                f"{v} is not allowed: use 0 (off: prompt chunks as large as max_num_batched_tokens allows) "
                "or a ratio of at least 1 (a step cannot be shorter than its own decode rows), e.g. 2"
            )
        return v

    @model_validator(mode="after")
    def _quantize_needs_native_cpu(self) -> ServeConfig:
        if self.quantize != "none":
            if self.engine == "vllm":
                raise ValueError(
                    f"quantize={self.quantize} is for the hf and llama-cpp engines (vLLM quantizes its own way)"
                )
            if self.model_impl == "transformers":
                raise ValueError(
                    f"quantize={self.quantize} needs the native decoder, not model_impl=transformers"
                )
            if self.device == "cuda":
                raise ValueError(
                    f"quantize={self.quantize} runs on CPU only; use --device cpu or --quantize none"
                )
        return self

    @model_validator(mode="after")
    def _llama_cpp_args_need_that_engine(self) -> ServeConfig:
        if self.llama_cpp_args and self.engine != "llama-cpp":
            raise ValueError(
                f"llama_cpp_args (--llama-cpp-arg) are for --engine llama-cpp, not {self.engine}"
            )
        if self.engine == "llama-cpp" and (self.adapter_dirs or self.allow_runtime_lora):
            raise ValueError(
                "--engine llama-cpp serves only the adapters given with --adapter at start-up (llama-server "
                "reads LoRA files once); drop --adapter-dir/--allow-runtime-lora, or use --engine hf"
            )
        return self

    @model_validator(mode="after")
    def _runtime_lora_needs_a_root(self) -> ServeConfig:
        if self.allow_runtime_lora and not self.adapter_dirs:
            raise ValueError(
                "allow_runtime_lora needs at least one adapter directory: add --adapter-dir DIR (e.g. "
                "--adapter-dir saves), the folder runtime loading may read adapters from"
            )
        if (
            self.max_cpu_loras is not None
            and self.max_loras is not None
            and self.max_cpu_loras < self.max_loras
        ):
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("LLM_SERVE_API_KEY") or None


def load_config(path: str | Path | None, overrides: dict) -> ServeConfig:
    """Merge YAML (if any) with explicit overrides and validate."""
    return load_settings(ServeConfig, path, overrides, error=ConfigError, prog="llm-serve")
