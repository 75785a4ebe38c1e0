"""Model resolution shared by every stage: `default`, HF checkpoint directories and GGUF files."""

from serve.models.registry import ModelNotFoundError, ResolvedModel, llm_serve_home, resolve_model

__all__ = ["ModelNotFoundError", "ResolvedModel", "llm_serve_home", "resolve_model"]
