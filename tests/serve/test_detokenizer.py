"""Incremental detokenisation and stop strings with the real tokenizer (multi-byte text included)."""

import pytest

from serve.engine.detokenizer import IncrementalDetokenizer, _partial_suffix


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The capital of France is Paris.",
        "用四郎的口吻回答问题：朕知道了。",
        "emoji 🎉 ok",
        # Spaces before punctuation are text too (JSON indentation before a comma).
        '{"ok": false\n           ,"n": 3 , "m" : 4 .}',
    ],
)
def test_streamed_text_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_truncates_and_never_leaks(tokenizer):
    ids = tokenizer.encode("one two STOP three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    assert "".join(pieces) == "one two "
    assert detok.stopped
    assert not any("ST" in p for p in pieces)


def test_partial_suffix():
    assert _partial_suffix("abc ST", "STOP") == 2
    assert _partial_suffix("abc", "STOP") == 0
    assert _partial_suffix("S", "STOP") == 1
