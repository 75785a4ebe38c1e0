"""Fixtures for the export tests: small tokenizers, tiny checkpoints of each architecture, adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.tiny_models import byte_bpe_tokenizer, spm_tokenizer, tiny_checkpoint


@pytest.fixture(scope="session")
def small_tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {"bpe": byte_bpe_tokenizer(root / "bpe"), "spm": spm_tokenizer(root / "spm")}


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory, small_tokenizers) -> Path:
    """A tiny Llama with a 400-token byte-level BPE: GGUF round trips in a second or two."""
    return tiny_checkpoint("llama", small_tokenizers["bpe"], tmp_path_factory.mktemp("small-llama"))


@pytest.fixture(scope="session")
def small_llama_adapter(tmp_path_factory, small_llama) -> Path:
    from tests.helpers.adapters import make_lora_adapter

    return make_lora_adapter(small_llama, tmp_path_factory.mktemp("small-adapter") / "a", seed=0)
