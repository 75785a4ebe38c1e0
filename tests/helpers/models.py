"""Tiny offline model fixtures: random 2-layer Llama/Mistral/Qwen2 models sharing the default model's tokenizer."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

REAL_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "smollm2-tokenizer"


def write_real_tokenizer(out: Path) -> Path:
    """The default model's tokenizer files (tests/data/smollm2-tokenizer) in `out`, no model conversion."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes(gzip.decompress((REAL_TOKENIZER / "tokenizer.json.gz").read_bytes()))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(REAL_TOKENIZER / name, out / name)
    return out


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def make_tiny_llama(tokenizer_src: Path, out: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Save a small LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads) with the real tokenizer to `out`."""
    return make_tiny_model(tokenizer_src, out, seed=seed, layers=layers)


def make_tiny_model(
    tokenizer_src: Path,
    out: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    layers: int = 2,
    **config_overrides,
) -> Path:
    """A small random `arch` ("llama", "mistral", "qwen2") model with the real tokenizer, saved to `out`.

    Biases (Qwen2's q/k/v) are drawn non-zero so that they matter in comparisons.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=arch != "mistral",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        dtype="float32",
        **config_overrides,
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).is_file():
            shutil.copy(tokenizer_src / name, out / name)
    return out
