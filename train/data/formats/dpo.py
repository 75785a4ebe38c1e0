"""Preference rows for DPO and reward modelling: a prompt plus a `chosen` and a `rejected` response.

ShareGPT layout: `conversations` ending with the user, `chosen`/`rejected` message objects.
Alpaca layout: `instruction`/`input` with `chosen`/`rejected` strings. Entries carry `ranking: true`.
"""

from __future__ import annotations

from typing import Any

from serve.artifacts.dataset_registry import DatasetEntry
from train.data.formats import alpaca, sharegpt
from train.data.formats.base import RowError, Sample, cell, text_cell

NAME = "dpo"


def detect(row: dict[str, Any]) -> bool:
    return "chosen" in row and "rejected" in row


def default_entry(file_name: str, row: dict[str, Any]) -> DatasetEntry:
    if "conversations" in row or "messages" in row:
        entry = sharegpt.default_entry(file_name, row)
        entry.columns = {**(entry.columns or {}), "chosen": "chosen", "rejected": "rejected"}
    else:
        entry = alpaca.default_entry(file_name, row)
        cols = {k: v for k, v in (entry.columns or {}).items() if k != "response"}
        entry.columns = {**cols, "chosen": "chosen", "rejected": "rejected"}
    entry.ranking = True
    return entry


def _response(row: dict[str, Any], entry: DatasetEntry, key: str, *, messages: bool) -> str:
    column = entry.column(key)
    if not messages:
        return text_cell(row, column, key)
    value = cell(row, column, key)
    role_tag, content_tag = entry.tag("role_tag"), entry.tag("content_tag")
    if not isinstance(value, dict) or role_tag not in value or content_tag not in value:
        raise RowError(
            f"missing {key}: column {column!r} must be a message object with {role_tag!r} and {content_tag!r}"
        )
    if value[role_tag] not in (entry.tag("assistant_tag"), entry.tag("function_tag")):
        raise RowError(f"{key} has role {value[role_tag]!r}, expected {entry.tag('assistant_tag')!r}")
    content = value[content_tag]
    if not isinstance(content, str) or not content.strip():
        raise RowError(f"empty {key} response")
    return content


def parse(row: dict[str, Any], entry: DatasetEntry) -> Sample:
    if not entry.ranking:
        raise RowError("preference data needs `ranking: true` in its dataset_info.json entry")
    messages = entry.formatting in ("sharegpt", "openai")
    if messages:
        system, turns = sharegpt.parse_messages(row, entry, end_with="user")
    else:
        system, turns = alpaca.parse_prompt(row, entry)
    chosen = _response(row, entry, "chosen", messages=messages)
    rejected = _response(row, entry, "rejected", messages=messages)
    return Sample(system=system, messages=turns, response=chosen, rejected=rejected)
