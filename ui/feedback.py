"""Feedback from the chat page as training data LLaMA-Factory reads directly.

Thumbs up/down on a reply appends a KTO row to `FEEDBACK_DIR/kto.jsonl`; "left/right is better" on an
A/B pair appends a DPO row to `FEEDBACK_DIR/dpo.jsonl`. `FEEDBACK_DIR/dataset_info.json` declares both
(`feedback_kto`, `feedback_dpo`) in the shapes of LLaMA-Factory's kto_en_demo/dpo_en_demo, with OpenAI
role/content tags, so `llm-train` takes `dataset_dir: feedback` and `dataset: feedback_kto` as is.

Appends hold an exclusive file lock (several pages or processes may write at once); dataset_info.json
is rewritten atomically (temporary file + rename) and keeps any other datasets declared there.

    store = FeedbackStore(Path("feedback"))
    store.record_kto([{"role": "user", ...}, {"role": "assistant", ...}], liked=True, model="base")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from serve.artifacts.dataset_registry import DatasetEntry, DatasetInfoError, register_entries

KTO_FILE = "kto.jsonl"
DPO_FILE = "dpo.jsonl"
LOCK_FILE = ".feedback.lock"
KTO_DATASET = "feedback_kto"
DPO_DATASET = "feedback_dpo"

# OpenAI-style messages; system_tag lets a leading {"role": "system"} message carry the system prompt.
_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}
ENTRIES = {
    KTO_DATASET: DatasetEntry(
        KTO_FILE, formatting="sharegpt", columns={"messages": "messages", "kto_tag": "label"}, tags=_TAGS
    ),
    DPO_DATASET: DatasetEntry(
        DPO_FILE,
        formatting="sharegpt",
        ranking=True,
        columns={"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        tags=_TAGS,
    ),
}
DATASET_INFO = {name: entry.to_info() for name, entry in ENTRIES.items()}  # as written to dataset_info.json


class FeedbackError(ValueError):
    """The feedback cannot become a training row; the message says why."""


@dataclass(frozen=True)
class SavedRow:
    """Where a feedback row landed: the file and its 1-based line number."""

    path: Path
    row: int
    dataset: str


def _check_turns(messages: list[dict], *, ends_with: str) -> None:
    """Raise unless messages are (system?) user, assistant, user, ... ending with role `ends_with`."""
    turns = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if not turns:
        raise FeedbackError("the conversation has no user message to rate")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise FeedbackError(
                f"message {i} has role {message.get('role')!r}, expected {expected!r}: turns must alternate"
            )
        if not isinstance(message.get("content"), str):
            raise FeedbackError(f"message {i} has no text content")
    if turns[-1]["role"] != ends_with:
        raise FeedbackError(f"the conversation must end with a {ends_with} message")


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FeedbackStore:
    """Append-only KTO/DPO files plus their dataset_info.json in one folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_dataset_info(self) -> None:
        """Declare our datasets in dataset_info.json, keeping entries others put there."""
        try:
            register_entries(self.root, ENTRIES)
        except DatasetInfoError as exc:
            raise FeedbackError(str(exc)) from exc

    def _append(self, file_name: str, dataset: str, row: dict) -> SavedRow:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._locked():
            self._write_dataset_info()
            path = self.root / file_name
            with open(path, "a+", encoding="utf-8") as f:
                f.seek(0)
                existing = sum(1 for _ in f)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return SavedRow(path=path, row=existing + 1, dataset=dataset)

    def record_kto(self, messages: list[dict], *, liked: bool, model: str) -> SavedRow:
        """Append `messages` (ending with the rated assistant reply) with label `liked` to kto.jsonl."""
        _check_turns(messages, ends_with="assistant")
        if not messages[-1]["content"].strip():
            raise FeedbackError("the rated reply is empty")
        row = {"messages": _clean(messages), "label": bool(liked), "model": model, "created": _now()}
        return self._append(KTO_FILE, KTO_DATASET, row)

    def record_dpo(
        self,
        conversation: list[dict],
        *,
        chosen: str,
        rejected: str,
        chosen_model: str,
        rejected_model: str,
    ) -> SavedRow:
        """Append a preference pair for `conversation` (ending with the user prompt) to dpo.jsonl."""
        _check_turns(conversation, ends_with="user")
        if not chosen.strip() or not rejected.strip():
            raise FeedbackError("both replies must be non-empty to make a preference pair")
        if chosen == rejected:
            raise FeedbackError("the two replies are identical; there is nothing to prefer")
        row = {
            "conversations": _clean(conversation),
            "chosen": {"role": "assistant", "content": chosen},
            "rejected": {"role": "assistant", "content": rejected},
            "chosen_model": chosen_model,
            "rejected_model": rejected_model,
            "created": _now(),
        }
        return self._append(DPO_FILE, DPO_DATASET, row)
