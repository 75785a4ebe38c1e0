"""`dataset_info.json`, LLaMA-Factory's dataset registry: its entries, and the one reader and writer.

An entry (LLaMA-Factory's `DatasetAttr`) says how a file's columns map onto prompts and responses:
`formatting` (alpaca, sharegpt or openai), `ranking` (pairwise preference data), `columns` and, for
sharegpt-like data, `tags` (role names). Defaults are LLaMA-Factory 0.9.5's, so an entry means here
exactly what it means there.

Written only through `register_entries` (used by `llm-data register`, which `llm-data synth` and
`extract-role --register` call, and by the chat page's feedback store): it holds a lock on the
folder, keeps every other entry as it is and replaces the file atomically. Read by llm-train (to find
and validate each dataset), `llm-data` and `llm-eval` (a reference file's registered columns).

    register_entries(Path("data"), {"mine": DatasetEntry("mine.json")})   # {"mine": "added"}
    entry, file = find_entry(Path("data"), "mine")
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from serve.atomic import write_json_atomic
from serve.cli_runner import UserError

DATASET_INFO = "dataset_info.json"

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# The tags an OpenAI-style `messages` list uses (LLaMA-Factory's kto demo entry spells these out).
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
COLUMN_KEYS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "images",
    "videos",
    "audios",
    "chosen",
    "rejected",
    "kto_tag",
)


class DatasetInfoError(UserError, ValueError):
    """`dataset_info.json` is missing, unreadable or lacks the named dataset."""


@dataclass
class DatasetEntry:
    """How LLaMA-Factory reads one dataset file; `to_info()` is the JSON written to dataset_info.json."""

    file_name: str
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] | None = (
        None  # None: LLaMA-Factory's defaults; given: unlisted columns are unused
    )
    tags: dict[str, str] | None = None  # same rule as columns
    extra: dict[str, Any] = field(default_factory=dict)  # keys we do not interpret, kept as they are

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> DatasetEntry:
        known = {"file_name", "formatting", "ranking", "columns", "tags"}
        return cls(
            file_name=str(info.get("file_name", "")),
            formatting=str(info.get("formatting", "alpaca")),
            ranking=bool(info.get("ranking", False)),
            columns=dict(info["columns"]) if isinstance(info.get("columns"), dict) else None,
            tags=dict(info["tags"]) if isinstance(info.get("tags"), dict) else None,
            extra={k: v for k, v in info.items() if k not in known},
        )

    def to_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"file_name": self.file_name}
        if self.formatting != "alpaca":
            info["formatting"] = self.formatting
        if self.ranking:
            info["ranking"] = True
        if self.columns is not None:
            info["columns"] = dict(self.columns)
        if self.tags is not None:
            info["tags"] = dict(self.tags)
        info.update(self.extra)
        return info

    def column(self, key: str) -> str | None:
        """The file's column for LLaMA-Factory's `key`: once `columns` is given, unlisted keys are unused."""
        if self.columns is not None:
            return self.columns.get(key)
        return {**ALPACA_COLUMNS, "messages": "conversations"}.get(key)

    def tag(self, key: str) -> str | None:
        """The role/content tag for `key`; as with columns, a given `tags` replaces all defaults."""
        if self.tags is not None:
            return self.tags.get(key)
        return SHAREGPT_TAGS[key]


def load_dataset_info(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `DIR/dataset_info.json` ({} when it does not exist yet)."""
    path = Path(dataset_dir) / DATASET_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetInfoError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(info, dict):
        raise DatasetInfoError(f"{path}: must be a JSON object mapping dataset names to entries")
    return info


def find_entry(dataset_dir: str | os.PathLike, name: str) -> tuple[DatasetEntry, Path]:
    """The entry named `name` and the data file it points at; raises DatasetInfoError naming what exists."""
    info = load_dataset_info(dataset_dir)
    path = Path(dataset_dir) / DATASET_INFO
    if name not in info:
        known = ", ".join(sorted(info)) or "none"
        raise DatasetInfoError(
            f"dataset {name!r} is not in {path} (registered: {known}); add it with "
            f"`llm-data register FILE --name {name} --dataset-dir {dataset_dir}`"
        )
    entry = DatasetEntry.from_info(info[name])
    if not entry.file_name:
        raise DatasetInfoError(
            f"{path}: dataset {name!r} has no local file_name (hub datasets are not used offline)"
        )
    return entry, Path(dataset_dir) / entry.file_name


Change = Literal["added", "updated", "unchanged"]


def register_entries(dataset_dir: str | os.PathLike, entries: dict[str, DatasetEntry]) -> dict[str, Change]:
    """Add or replace `entries` in `DIR/dataset_info.json`, keeping the others; the file is only
    rewritten when something changed. Concurrent writers (two `llm-data register`, two chat pages)
    take turns on a lock of the folder, so no entry is lost."""
    directory = Path(dataset_dir)
    changes: dict[str, Change] = {}
    with _locked(directory):
        info = load_dataset_info(directory)
        for name, entry in entries.items():
            new = entry.to_info()
            changes[name] = "unchanged" if info.get(name) == new else "updated" if name in info else "added"
            info[name] = new
        if any(c != "unchanged" for c in changes.values()):
            write_json_atomic(directory / DATASET_INFO, info)
    return changes


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # the folder itself: no lock file to leave behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
