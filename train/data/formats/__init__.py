"""The dataset formats `llm-data` and `llm-train` know, and how one is picked for a file or an entry.

`--format auto` looks at the first row's columns; a dataset_info.json entry (plus the training stage)
decides the format of a registered dataset the way LLaMA-Factory will read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve.artifacts.dataset_registry import OPENAI_TAGS, DatasetEntry
from train.data.formats import alpaca, dpo, kto, pretrain, sharegpt
from train.data.formats.base import RowError, Sample

__all__ = ["FORMATS", "Format", "RowError", "Sample", "detect_format", "format_for_entry", "get_format"]


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict[str, Any]], bool]
    default_entry: Callable[[str, dict[str, Any]], DatasetEntry]
    parse: Callable[[dict[str, Any], DatasetEntry], Sample]


def _openai_entry(file_name: str, row: dict[str, Any]) -> DatasetEntry:
    entry = sharegpt.default_entry(file_name, row)
    entry.columns = {**(entry.columns or {}), "messages": "messages"}
    entry.tags = dict(OPENAI_TAGS)
    return entry


# Detection order matters: preference and KTO rows also carry messages or instructions.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            dpo.NAME,
            "prompt + chosen + rejected (DPO, reward model)",
            dpo.detect,
            dpo.default_entry,
            dpo.parse,
        ),
        Format(kto.NAME, "conversation + boolean label (KTO)", kto.detect, kto.default_entry, kto.parse),
        Format(
            sharegpt.NAME,
            "conversations of from/value",
            sharegpt.detect,
            sharegpt.default_entry,
            sharegpt.parse,
        ),
        Format(
            sharegpt.OPENAI_NAME,
            "messages of role/content",
            sharegpt.detect_openai,
            _openai_entry,
            sharegpt.parse,
        ),
        Format(
            alpaca.NAME,
            "instruction/input/output/system/history",
            alpaca.detect,
            alpaca.default_entry,
            alpaca.parse,
        ),
        Format(
            pretrain.NAME,
            "plain text (pre-training)",
            pretrain.detect,
            pretrain.default_entry,
            pretrain.parse,
        ),
    )
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)} or auto")
    return FORMATS[name]


def detect_format(row: dict[str, Any], columns: dict[str, str] | None = None) -> Format:
    """The format of a file from its first row (and a user's column mapping, when given)."""
    if columns:
        if "chosen" in columns or "rejected" in columns:
            return FORMATS[dpo.NAME]
        if "kto_tag" in columns:
            return FORMATS[kto.NAME]
        if "messages" in columns:
            return FORMATS[sharegpt.OPENAI_NAME if sharegpt.detect_openai(row) else sharegpt.NAME]
        if "response" in columns:
            return FORMATS[alpaca.NAME]
        if "prompt" in columns:
            return FORMATS[pretrain.NAME]
    for fmt in FORMATS.values():
        if fmt.detect(row):
            return fmt
    raise ValueError(
        f"cannot tell the format from the columns {sorted(row)}; pass --format "
        f"({', '.join(FORMATS)}) and --columns if the names differ from the usual ones"
    )


def format_for_entry(entry: DatasetEntry, stage: str | None = None) -> Format:
    """How LLaMA-Factory will read a registered dataset for `stage` (sft, pt, dpo, kto, rm)."""
    if entry.ranking:
        return FORMATS[dpo.NAME]
    if entry.column("kto_tag"):
        return FORMATS[kto.NAME]
    if stage == "pt":
        return FORMATS[pretrain.NAME]
    if entry.formatting in ("sharegpt", "openai"):
        return FORMATS[sharegpt.NAME]
    if entry.column("response") is None and entry.column("prompt"):
        return FORMATS[pretrain.NAME]
    return FORMATS[alpaca.NAME]
