"""Checks on what an endpoint wrote for `llm-data synth`: entry shape, grounding, the alpaca parser.

`validate_entries` turns one parsed reply into alpaca rows and counts the dropped entries by reason
(missing_field, placeholder_or_echo, duplicate, ungrounded, invalid_row, ...). `check_written`
runs `llm-data validate`'s checks on the final file. Pure functions; used by synth.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from train.data.chunking import Chunk
from train.data.openai_client import ReplyParseError, parse_json_reply

_INSTRUCTION_KEYS = ("instruction", "question", "q", "问题", "prompt")
_OUTPUT_KEYS = ("output", "answer", "a", "答案", "response")
_CJK = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_EN_STOP = {
    "what",
    "which",
    "this",
    "that",
    "with",
    "from",
    "they",
    "their",
    "there",
    "about",
    "does",
    "have",
    "would",
    "could",
    "should",
    "text",
    "answer",
    "question",
    "analyze",
    "compare",
    "explain",
    "evaluate",
}


def alpaca_row_problem(row: dict) -> str | None:
    """Why `llm-data validate` (the training stage's alpaca parser) would refuse `row`, or None."""
    from train.data.formats import RowError, get_format

    fmt = get_format("alpaca")
    try:
        fmt.parse(row, fmt.default_entry("rows", row))
    except RowError as e:
        return str(e)
    return None


def check_written(path: Path, columns: dict[str, str]) -> None:
    """Validate the final file with `llm-data validate`'s checks; raise naming the first problems."""
    from train.data.validate import validate_file

    report = validate_file(path, "alpaca", columns=columns)
    if not report.ok:
        shown = "\n".join(str(p) for p in report.problems[:5])
        raise ValueError(
            f"{path} does not pass `llm-data validate` ({len(report.problems)} problems):\n{shown}"
        )


def content_terms(text: str, language: str) -> set[str]:
    """Character pairs of CJK text, or lower-cased words of 4+ letters (no stop words) otherwise."""
    if language == "zh" or _CJK.search(text):
        chars = [c for c in text if _CJK.match(c)]
        pairs = {chars[i] + chars[i + 1] for i in range(len(chars) - 1)}
        if language == "zh":
            return pairs
    else:
        pairs = set()
    return pairs | {w.lower() for w in _WORD.findall(text) if w.lower() not in _EN_STOP}


def _pick(entry: dict, keys: tuple[str, ...]) -> str:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def string_field(max_length: int) -> dict:
    # Bounded strings: a small model under a grammar otherwise writes one string until max_tokens.
    return {"type": "string", "minLength": 2, "maxLength": max_length}


def reply_schema(name: str, key: str, items: list[dict] | dict, count: int | None = None) -> dict:
    """`{"name", "schema"}` for a reply `{key: [...]}`: the i-th of `items` (a list) or every item (a dict)."""
    array: dict = {"type": "array"}
    if isinstance(items, list):
        array.update(prefixItems=items, items=False, minItems=len(items), maxItems=len(items))
    else:
        array["items"] = items
        if count is not None:
            array.update(maxItems=count)
    return {
        "name": name,
        "schema": {
            "type": "object",
            "properties": {key: array},
            "required": [key],
            "additionalProperties": False,
        },
    }


def entries_of(value) -> list:
    """The list of entries in a parsed reply: a list, {"entries": [...]}, any one list value, or one entry."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("entries"), list):
            return value["entries"]
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        return [value]
    return []


def validate_entries(
    raw: list,
    chunk: Chunk,
    types: list[str],
    *,
    language: str,
    min_shared_terms: int,
    known_types: list[str] = (),
) -> tuple[list[dict], dict[str, int]]:
    """Keep the valid entries of one reply as alpaca rows; count the dropped ones by reason.

    `types` are the types asked for, by position; an entry labelled with another of `known_types`
    keeps its own label.
    """
    rows: list[dict] = []
    dropped: dict[str, int] = {}
    chunk_terms = content_terms(chunk.text, language)
    seen: set[str] = set()

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    for position, entry in enumerate(raw):
        if len(rows) >= len(types):
            drop("extra")
            continue
        if not isinstance(entry, dict):
            drop("not_an_object")
            continue
        instruction, output = _pick(entry, _INSTRUCTION_KEYS), _pick(entry, _OUTPUT_KEYS)
        if not instruction or not output:
            drop("missing_field")
            continue
        if len(instruction) > 1000 or len(output) > 6000:
            drop("too_long")
            continue
        if (
            len(output) < 2
            or output == instruction
            or instruction in {"问题", "question"}
            or output in {"答案", "answer"}
        ):
            drop("placeholder_or_echo")
            continue
        key = re.sub(r"\s+", "", instruction).lower()
        if key in seen:
            drop("duplicate")
            continue
        if len(content_terms(instruction + " " + output, language) & chunk_terms) < min_shared_terms:
            drop("ungrounded")
            continue
        given = entry.get("type")
        qtype = (
            given
            if isinstance(given, str) and given in {*types, *known_types}
            else types[min(position, len(types) - 1)]
        )
        row = {
            "instruction": instruction,
            "input": "",
            "output": output,
            "chunk_id": chunk.id,
            "question_type": qtype,
        }
        if alpaca_row_problem(row):
            drop("invalid_row")
            continue
        seen.add(key)
        rows.append(row)
    return rows, dropped


def new_chunk_stats(chunk: Chunk) -> dict:
    """The per-chunk counters every LLM-backed data command records in its journal."""
    return {
        "chunks": 1,
        "chunk_tokens": chunk.n_tokens,
        "requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }


def ask_for_entries(
    client,
    messages: list[dict],
    stats: dict,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    schema: dict | None = None,
):
    """One request: count its tokens into `stats`, return the reply's entries, or None (and count it)
    when the reply holds no JSON. `schema` (`{"name", "schema"}`) is the reply's JSON schema."""
    reply = client.chat(
        messages, max_tokens=max_tokens, temperature=temperature, seed=seed, json_schema=schema
    )
    stats["requests"] += 1
    stats["prompt_tokens"] += reply.prompt_tokens
    stats["completion_tokens"] += reply.completion_tokens
    if reply.finish_reason == "length":
        stats["replies_cut_by_max_tokens"] = stats.get("replies_cut_by_max_tokens", 0) + 1
    try:
        return entries_of(parse_json_reply(reply.text))
    except ReplyParseError:
        stats["unparseable_replies"] = stats.get("unparseable_replies", 0) + 1
        return None
