"""Alpaca rows: `instruction`, `input`, `output`, optional `system` and `history` ([[query, answer], ...]).

LLaMA-Factory joins instruction and input with a newline into the user turn; `history` pairs come
before it. The persona layout (`system/input/output`, no instruction) is alpaca with the prompt unmapped.
"""

from __future__ import annotations

from typing import Any

from serve.artifacts.dataset_registry import DatasetEntry
from train.data.formats.base import RowError, Sample, cell, optional_text, text_cell

NAME = "alpaca"
_KNOWN = {
    "instruction": "prompt",
    "input": "query",
    "output": "response",
    "system": "system",
    "history": "history",
}


def detect(row: dict[str, Any]) -> bool:
    return "output" in row and ("instruction" in row or "input" in row)


def default_entry(file_name: str, row: dict[str, Any]) -> DatasetEntry:
    columns = {key: col for col, key in _KNOWN.items() if col in row}
    return DatasetEntry(file_name=file_name, columns=columns)


def parse_prompt(row: dict[str, Any], entry: DatasetEntry) -> tuple[str, list[dict[str, str]]]:
    """System prompt and user turns (history first) of an alpaca-layout row."""
    messages: list[dict[str, str]] = []
    history = cell(row, entry.column("history"), "history", required=False)
    if history not in (None, "", []):
        if not isinstance(history, list):
            raise RowError(
                f"history (column {entry.column('history')!r}) must be a list of [query, answer] pairs"
            )
        for i, pair in enumerate(history, start=1):
            if not (
                isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise RowError(f"history entry {i} must be a [query, answer] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    parts = [
        optional_text(row, entry.column("prompt"), "instruction"),
        optional_text(row, entry.column("query"), "input"),
    ]
    query = "\n".join(p for p in parts if p)
    if not query.strip():
        raise RowError("empty prompt: instruction and input are both empty")
    messages.append({"role": "user", "content": query})
    return optional_text(row, entry.column("system"), "system"), messages


def parse(row: dict[str, Any], entry: DatasetEntry) -> Sample:
    system, messages = parse_prompt(row, entry)
    response = text_cell(row, entry.column("response"), "output")
    return Sample(system=system, messages=messages, response=response)
