"""Pre-training rows: plain `text` (LLaMA-Factory maps it with `columns: {"prompt": "text"}`)."""

from __future__ import annotations

from typing import Any

from serve.artifacts.dataset_registry import DatasetEntry
from train.data.formats.base import Sample, text_cell

NAME = "pt"


def detect(row: dict[str, Any]) -> bool:
    return "text" in row


def default_entry(file_name: str, row: dict[str, Any]) -> DatasetEntry:
    return DatasetEntry(file_name=file_name, columns={"prompt": "text"})


def parse(row: dict[str, Any], entry: DatasetEntry) -> Sample:
    return Sample(text=text_cell(row, entry.column("prompt"), "text"))
