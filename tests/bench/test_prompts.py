"""Prompts of set token lengths from the fixed local text, with the default model's real tokenizer."""

from __future__ import annotations

import pytest

from serve.bench.prompts import build_prompts, chat_overhead, load_tokenizer


@pytest.fixture(scope="module")
def tok(real_tokenizer_dir):
    return load_tokenizer(str(real_tokenizer_dir))


def _chat_len(tok, text):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return len(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.mark.parametrize("length", [64, 128])
def test_chat_prompts_have_the_set_length(tok, length):
    prompts = build_prompts(tok, 8, length, seed=0)
    assert len(prompts) == 8 and len(set(prompts)) == 8  # distinct: no shared prefix cache
    for p in prompts:  # re-tokenising a cut text may merge or split a token at its edges
        assert abs(_chat_len(tok, p) - length) <= 3


def test_prompts_are_reproducible_and_seeded(tok):
    assert build_prompts(tok, 4, 32, seed=1) == build_prompts(tok, 4, 32, seed=1)
    assert build_prompts(tok, 4, 32, seed=1) != build_prompts(tok, 4, 32, seed=2)
    raw = build_prompts(tok, 3, 40, seed=0, chat=False)
    assert all(abs(len(tok.encode(p, add_special_tokens=False)) - 40) <= 2 for p in raw)
    assert chat_overhead(tok) > 0  # SmolLM2's template adds a default system prompt


def test_bad_lengths_are_refused(tok):
    with pytest.raises(ValueError, match="length >= 1"):
        build_prompts(tok, 2, 0, seed=0)
