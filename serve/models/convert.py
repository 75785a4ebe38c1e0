"""Convert a GGUF file into a float32 safetensors checkpoint that transformers, PEFT and
LLaMA-Factory load directly.

transformers dequantises GGUF on every load (~40 s for the default model) and refuses to
`save_pretrained` a GGUF-loaded model, so the weights are rebuilt into a fresh model from the
config and saved once. Float32 on purpose: a bf16 config makes CPU training ~6x slower.
The checkpoint is written to a staging directory beside the target and published (serve.artifacts.
publish) under a file lock, so a killed or concurrent conversion never leaves a half checkpoint, and
the next conversion removes what a killed one left.
"""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path

from serve.artifacts.model_folder import stop_token_ids
from serve.artifacts.publish import publish_dir, staged_dir

logger = logging.getLogger(__name__)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Write `target` (an HF checkpoint dir) from `gguf_path`; a no-op if another process did it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        # A leftover non-checkpoint directory at target (no config.json) is replaced by the publish.
        with staged_dir(target) as tmp:
            _convert_into(gguf_path, tmp)
            publish_dir(tmp, target)
    return target


def _convert_into(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.monotonic()
    logger.info("converting %s to a float32 checkpoint (once; ~40 s for the default model)", gguf_path)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = gguf_model.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings legitimately omit lm_head; anything else means the GGUF did not map cleanly.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    _fix_special_tokens(tokenizer, config)
    eos_ids = _eos_ids(tokenizer, config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0],
    )
    model.save_pretrained(out, safe_serialization=True)
    # transformers records how the files were found (HF_HUB_OFFLINE in the converting process sets
    # local_files_only) in tokenizer_config.json: the same default model must convert to the same
    # files whoever converts it first (a bench with HF_HUB_OFFLINE=1, or `llm-serve`).
    tokenizer.init_kwargs["local_files_only"] = False
    tokenizer.save_pretrained(out)
    logger.info("converted in %.1f s into %s", time.monotonic() - start, out)


def _fix_special_tokens(tokenizer, config) -> None:
    """transformers' GGUF tokenizer conversion can mislabel EOS (SmolLM2's came out as
    `<|im_start|>`); the model config's ids are authoritative, as in the original checkpoint."""
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos))
    pad = getattr(config, "pad_token_id", None)
    tokenizer.pad_token = (
        tokenizer.convert_ids_to_tokens(int(pad)) if pad is not None else tokenizer.eos_token
    )


def _eos_ids(tokenizer, config) -> list[int]:
    """EOS ids: the chat template's end-of-turn token (`<|im_end|>` for ChatML), the tokenizer's and the config's."""
    config_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return stop_token_ids(
        tokenizer, tokenizer.chat_template, extra_ids=[int(i) for i in config_ids if i is not None]
    )
