"""Chunking on paragraph/sentence boundaries, tolerant JSON parsing, entry validation, the journal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from train.data.chunk_journal import ChunkJournal, ChunkResult, JournalMismatchError
from train.data.chunking import Chunk, chunk_text, split_sentences
from train.data.openai_client import ReplyParseError, parse_json_reply
from train.data.synth_checks import entries_of, validate_entries

PROSE = (Path(__file__).parent / "data" / "prose_zh.txt").read_text(encoding="utf-8")


def count_chars(s: str) -> int:
    return len(re.sub(r"\s", "", s))


def test_sentences_split_on_chinese_and_english_punctuation():
    assert split_sentences("他说：“走吧。”她没动！为什么？好；Then he left. It rained... Fine") == [
        "他说：“走吧。”",
        "她没动！",
        "为什么？",
        "好；",
        "Then he left.",
        "It rained...",
        "Fine",
    ]
    assert split_sentences("Pi is 3.14 today.") == ["Pi is 3.14 today."]


def test_chunks_respect_the_budget_keep_sentences_whole_and_cover_the_text():
    chunks = chunk_text(PROSE, count_chars, chunk_tokens=100)
    assert len(chunks) > 5
    assert all(c.n_tokens <= 100 for c in chunks)
    # Without overlap the chunks are the text again, in order, cut only at sentence ends.
    assert "".join(c.text for c in chunks).replace("\n", "") == PROSE.replace("\n", "")
    assert all(c.text[-1] in "。！？”" for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks == chunk_text(PROSE, count_chars, chunk_tokens=100), "ids must be stable across runs"


def overlaps(chunks: list[Chunk]) -> list[int]:
    """Tokens at the start of each chunk that repeat whole sentences ending the previous one."""
    found = []
    for a, b in zip(chunks, chunks[1:], strict=False):
        sentences, head = split_sentences(a.text.replace("\n", "")), b.text.replace("\n", "")
        tails = ("".join(sentences[-k:]) for k in range(len(sentences), 0, -1))
        found.append(next((count_chars(t) for t in tails if head.startswith(t)), 0))
    return found


def test_overlap_repeats_trailing_sentences_within_the_budget():
    assert set(overlaps(chunk_text(PROSE, count_chars, chunk_tokens=100))) == {0}
    with_overlap = overlaps(chunk_text(PROSE, count_chars, chunk_tokens=100, overlap_tokens=30))
    assert max(with_overlap) <= 30
    assert sum(1 for n in with_overlap if n) >= len(with_overlap) // 2


def test_paragraph_that_fits_is_not_split_and_long_sentences_are():
    text = "短段落一。第二句。\n\n" + "很长的句子，" * 40 + "结束。"
    chunks = chunk_text(text, count_chars, chunk_tokens=50)
    assert chunks[0].text.startswith("短段落一。第二句。")
    assert all(c.n_tokens <= 50 for c in chunks)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_text(text, count_chars, chunk_tokens=4)


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            '{"entries": [{"instruction": "a", "output": "b"}]}',
            {"entries": [{"instruction": "a", "output": "b"}]},
        ),
        ('Sure!\n```json\n[{"q": 1},]\n```\nHope this helps.', [{"q": 1}]),
        ('Here: {"a": "x，y"} and more text', {"a": "x，y"}),
        ('[{"a": 1}, {"a": 2}, {"a": 3, "b": "cut off by max_to', [{"a": 1}, {"a": 2}]),
        ("{“instruction”: “问”, “output”: “答”}", {"instruction": "问", "output": "答"}),
    ],
)
def test_parse_json_reply_tolerates_what_small_models_write(reply, expected):
    assert parse_json_reply(reply) == expected


def test_parse_json_reply_rejects_text_without_json():
    with pytest.raises(ReplyParseError):
        parse_json_reply("I cannot help with that {not json}")


def test_entries_of_accepts_common_shapes():
    assert entries_of({"entries": [1]}) == [1]
    assert entries_of({"questions": [2]}) == [2]
    assert entries_of({"instruction": "q"}) == [{"instruction": "q"}]
    assert entries_of("text") == []


def test_validate_entries_counts_each_reason():
    chunk = Chunk("c00000-x", 0, "甄嬛提着食盒来到养心殿，为皇上送上莲子羹。", 20)
    raw = [
        {"type": "为什么", "question": "为什么甄嬛要送莲子羹？", "answer": "因为皇上在养心殿忙了一整日。"},
        {"instruction": "为什么甄嬛要送莲子羹？", "output": "重复的问题。"},
        {"instruction": "如何看待天气？", "output": "今天晴朗。"},
        {"instruction": "问题", "output": "答案"},
        {"instruction": "只有问题"},
        "not an object",
        {"instruction": "分析甄嬛的食盒。", "output": "食盒里装着莲子羹。"},
    ]
    rows, dropped = validate_entries(
        raw, chunk, ["如何看待", "分析", "为什么"], language="zh", min_shared_terms=2
    )
    assert [(r["question_type"], r["instruction"]) for r in rows] == [
        ("为什么", "为什么甄嬛要送莲子羹？"),
        ("为什么", "分析甄嬛的食盒。"),  # position 6 is past the types asked: the last one
    ]
    assert dropped == {
        "duplicate": 1,
        "ungrounded": 1,
        "placeholder_or_echo": 1,
        "missing_field": 1,
        "not_an_object": 1,
    }


def test_journal_resumes_cuts_torn_lines_and_refuses_other_settings(tmp_path):
    out = tmp_path / "qa.json"
    journal = ChunkJournal(out, {"per_chunk": 3})
    assert journal.open() == {}
    journal.append(ChunkResult("c00000-a", 0, [{"instruction": "q"}], {"kept": 1}))
    journal.append(ChunkResult("c00001-b", 1, [], {"kept": 0}))
    with open(journal.partial, "a", encoding="utf-8") as f:
        f.write('{"chunk_id": "c00002-c", "index": 2, "ro')  # a kill mid-write
    done = ChunkJournal(out, {"per_chunk": 3}).open()
    assert sorted(done) == ["c00000-a", "c00001-b"]
    assert journal.partial.read_text(encoding="utf-8").endswith("}\n")
    journal.append(ChunkResult("c00002-c", 2, [], {}))
    assert [json.loads(x)["chunk_id"] for x in journal.partial.read_text().splitlines()][-1] == "c00002-c"
    with pytest.raises(JournalMismatchError, match="per_chunk"):
        ChunkJournal(out, {"per_chunk": 4}).open()
    assert ChunkJournal(out, {"per_chunk": 4}).open(restart=True) == {}
