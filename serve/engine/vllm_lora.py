"""Checks and settings for serving LoRA adapters through vLLM, run before any weights load.

vLLM preallocates LoRA slots of one fixed rank (`max_lora_rank`, one of a few sizes) for
`max_loras` adapters at once, and cannot load adapters that resize the vocabulary or save full
copies of the embeddings / LM head (`modules_to_save`). These are the failures users hit at the first
request on other servers; here they are refused at start-up with what to do instead. Reads only
JSON files and safetensors headers: no vLLM or torch import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from serve.adapters import AdapterError, AdapterSpec
from serve.artifacts.model_folder import read_adapter_config
from serve.config import DEFAULT_MAX_LORAS, ServeConfig

#: The ranks vLLM can allocate LoRA slots for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: modules_to_save entries vLLM accepts (classification heads only).
_ALLOWED_MODULES_TO_SAVE = {"classifier", "score"}
_VOCAB_MODULES = ("embed_tokens", "lm_head", "wte", "embed_out")


@dataclass(frozen=True)
class LoRASettings:
    """vLLM engine arguments derived from the adapters served."""

    enable_lora: bool
    max_loras: int = 1  # adapters usable in one batch
    max_cpu_loras: int | None = None  # adapters kept loaded (all of them: none is evicted)
    max_lora_rank: int = 8  # slot rank: the smallest vLLM size >= every adapter's rank

    def engine_kwargs(self) -> dict:
        if not self.enable_lora:
            return {"enable_lora": False}
        return {
            "enable_lora": True,
            "max_loras": self.max_loras,
            "max_cpu_loras": self.max_cpu_loras,
            "max_lora_rank": self.max_lora_rank,
        }


def slot_rank(rank: int, adapter: str = "") -> int:
    """The smallest rank vLLM supports that holds `rank`; raises AdapterError above the largest."""
    for size in VLLM_LORA_RANKS:
        if rank <= size:
            return size
    who = f"adapter {adapter!r}: " if adapter else ""
    raise AdapterError(
        f"{who}LoRA rank {rank} is above the largest rank vLLM supports ({VLLM_LORA_RANKS[-1]}); "
        "serve it with the HF engine (--engine hf), or merge it into the base with `llm-export` "
        "and serve the merged model"
    )


def lora_settings(adapters: list[AdapterSpec], config: ServeConfig | None = None) -> LoRASettings:
    """vLLM's LoRA arguments: one slot per start-up adapter; with adapter directories or runtime
    loading, `--max-loras` slots (default 4) of `--max-lora-rank`, and `--max-cpu-loras` in vLLM's
    host cache (the others are read from their folder again when requested)."""
    dynamic = bool(config and (config.adapter_dirs or config.allow_runtime_lora))
    if not adapters and not dynamic:
        return LoRASettings(enable_lora=False)
    rank = max(slot_rank(a.rank, a.name) for a in adapters) if adapters else 1
    if config is not None and config.max_lora_rank:
        rank = max(rank, slot_rank(config.max_lora_rank))
    elif dynamic:
        rank = max(rank, 8)
    max_loras = len(adapters)
    if config is not None and config.max_loras:
        max_loras = config.max_loras
    elif dynamic:
        max_loras = max(DEFAULT_MAX_LORAS, len(adapters))
    cpu = (
        config.max_cpu_loras if config is not None and config.max_cpu_loras else max(max_loras, len(adapters))
    )
    return LoRASettings(enable_lora=True, max_loras=max_loras, max_cpu_loras=cpu, max_lora_rank=rank)


def check_vllm_adapter(spec: AdapterSpec, base_vocab_size: int) -> None:
    """Refuse what vLLM cannot serve: resized vocabularies and full embedding/LM-head copies."""
    cfg = read_adapter_config(spec.path)
    slot_rank(spec.rank, spec.name)
    saved = [m for m in cfg.modules_to_save if m not in _ALLOWED_MODULES_TO_SAVE]
    if saved:
        raise AdapterError(
            f"adapter {spec.name!r}: {spec.path / 'adapter_config.json'} saves full copies of "
            f"{saved} (modules_to_save), which vLLM cannot load; retrain without modules_to_save, "
            "or serve it with --engine hf"
        )
    if cfg.trainable_token_indices:
        raise AdapterError(
            f"adapter {spec.name!r}: it trains token embeddings (trainable_token_indices), which vLLM "
            "cannot load; serve it with --engine hf"
        )
    added = _added_vocab(spec.path, base_vocab_size)
    if added:
        raise AdapterError(
            f"adapter {spec.name!r}: {added}; vLLM cannot serve adapters with a resized vocabulary. "
            "Serve it with --engine hf, or merge it with `llm-export` and serve the merged model"
        )


def _added_vocab(path: Path, base_vocab_size: int) -> str | None:
    """Describe how the adapter grows the vocabulary, or None when it does not."""
    if (path / "new_embeddings.safetensors").is_file():
        return f"{path / 'new_embeddings.safetensors'} adds token embeddings"
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if not any(m in key for m in _VOCAB_MODULES):
                continue
            shape = list(f.get_slice(key).get_shape())
            lora = re.search(r"\.lora_(A|B|embedding_A|embedding_B)\b", key)
            if lora:
                # LoRA on the embedding ([r, vocab] A) or on the LM head ([vocab, r] B): the vocabulary
                # side must match the base.
                which = lora.group(1)
                vocab = shape[1] if which in ("A", "embedding_A") and "lm_head" not in key else None
                if which in ("B", "embedding_B") and "lm_head" in key:
                    vocab = shape[0]
                if vocab is not None and vocab != base_vocab_size:
                    return f"{key} has shape {shape}, but the base vocabulary has {base_vocab_size} tokens"
                continue
            return f"{key} is a full {shape} copy of a vocabulary-sized weight"
    return None
