"""A progress bar (step, loss, eval loss, tokens/s, ETA) fed by LLaMA-Factory's `trainer_log.jsonl`.

LLaMA-Factory's LogCallback appends one JSON line per logging step to `output_dir/trainer_log.jsonl`;
`TrainerLogTail` reads lines as they are completed and `ProgressBar` shows them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TrainerLogTail:
    """Yields the complete JSON lines appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.buffer = ""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        if self.path.stat().st_size < self.offset:  # the trainer restarted the log
            self.offset, self.buffer = 0, ""
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split("\n")
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


class ProgressBar:
    """tqdm bar over optimizer steps; the postfix shows the latest loss, eval loss and tokens/s."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.postfix: dict[str, str] = {}

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        total = row.get("total_steps") or None
        if self.bar is None:
            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
        elif total and self.bar.total != total:
            self.bar.total = total
        if row.get("loss") is not None:
            self.postfix["loss"] = f"{row['loss']:.4f}"
        if row.get("eval_loss") is not None:
            self.postfix["eval_loss"] = f"{row['eval_loss']:.4f}"
        if row.get("throughput"):
            self.postfix["tok/s"] = f"{row['throughput']:.1f}"
        step = int(row.get("current_steps") or 0)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
