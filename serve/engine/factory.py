"""Pick the engine implementation once, at start-up (heavy modules are imported only here)."""

from __future__ import annotations

from serve.adapters import AdapterSpec
from serve.config import ServeConfig
from serve.engine.base import Engine
from serve.models import ResolvedModel


def create_engine(config: ServeConfig, model: ResolvedModel, adapters: list[AdapterSpec]) -> Engine:
    if config.engine == "vllm":
        from serve.engine.vllm import VLLMEngine

        return VLLMEngine(config, model, adapters)
    if config.engine == "llama-cpp":
        from serve.engine.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(config, model, adapters)
    from serve.engine.hf import HFEngine

    return HFEngine(config, model, adapters)
