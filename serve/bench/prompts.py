"""Benchmark prompts of set token lengths, cut from a fixed local text (no hub datasets).

`build_prompts(tokenizer, n, length, seed)` takes `length` tokens of `corpus.txt` (cycled) from a
seeded random offset per prompt, so every run and every server gets the same prompts and no two
prompts share a prefix cache. With `chat=True` the chat template's own tokens (SmolLM2 adds a default
system prompt) count toward `length`, so the model sees about `length` prompt tokens.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Protocol

CORPUS_PATH = Path(__file__).with_name("corpus.txt")


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the prompt builder needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@cache
def corpus_text() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


def chat_overhead(tokenizer) -> int:
    """Tokens the chat template adds around an empty user message (0 without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def build_prompts(tokenizer: Tokenizer, n: int, length: int, seed: int, *, chat: bool = True) -> list[str]:
    """`n` prompts of about `length` tokens each (exact before re-tokenisation of the cut text)."""
    if n < 0 or length < 1:
        raise ValueError(f"need n >= 0 and length >= 1, got n={n}, length={length}")
    body = max(1, length - (chat_overhead(tokenizer) if chat else 0))
    tokens = tokenizer.encode(corpus_text(), add_special_tokens=False)
    if not tokens:
        raise ValueError(f"{CORPUS_PATH} tokenised to nothing")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        start = rng.randrange(len(tokens))
        ids = [tokens[(start + i) % len(tokens)] for i in range(body)]
        prompts.append(tokenizer.decode(ids))
    return prompts


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from a local path, or `default` for the embedded default model."""
    from transformers import AutoTokenizer

    if name_or_path == "default":
        from serve.models import resolve_model

        name_or_path = str(resolve_model("default").path)
    return AutoTokenizer.from_pretrained(name_or_path)
