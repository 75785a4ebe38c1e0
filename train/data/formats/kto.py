"""KTO rows: a conversation ending with the assistant plus a boolean `label` (desirable or not).

The label must be JSON `true`/`false`: LLaMA-Factory silently trains a row with any other label
as plain SFT, so strings such as "true" or numbers are errors here.
"""

from __future__ import annotations

from typing import Any

from serve.artifacts.dataset_registry import DatasetEntry
from train.data.formats import alpaca, sharegpt
from train.data.formats.base import RowError, Sample, cell

NAME = "kto"


def detect(row: dict[str, Any]) -> bool:
    return ("label" in row or "kto_tag" in row) and (
        "messages" in row or "conversations" in row or "output" in row
    )


def default_entry(file_name: str, row: dict[str, Any]) -> DatasetEntry:
    tag_column = "label" if "label" in row else "kto_tag"
    base = sharegpt if ("messages" in row or "conversations" in row) else alpaca
    entry = base.default_entry(file_name, row)
    entry.columns = {**(entry.columns or {}), "kto_tag": tag_column}
    return entry


def parse(row: dict[str, Any], entry: DatasetEntry) -> Sample:
    column = entry.column("kto_tag")
    label = cell(row, column, "KTO label")
    if not isinstance(label, bool):
        raise RowError(f"KTO label (column {column!r}) must be true or false, got {label!r}")
    base = sharegpt if entry.formatting in ("sharegpt", "openai") else alpaca
    sample = base.parse(row, entry)
    sample.label = label
    return sample
