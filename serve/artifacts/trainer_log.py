"""LLaMA-Factory's `trainer_log.jsonl`: one JSON row per logging step, the loss history of a run.

LLaMA-Factory's LogCallback appends `{"current_steps", "total_steps", "loss" | "eval_loss", ...}` to
`OUTPUT/trainer_log.jsonl` while it trains; llm-train publishes it with the adapter. Read by llm-train
(metrics for the manifest, the loss plot), `llm-eval` (the loss plot in its report) and the UI. A folder
trained elsewhere may only have HF Trainer's `trainer_state.json`, whose `log_history` is used instead.
(`train.progress.TrainerLogTail` follows the file while it grows; this module reads it once.)

    rows = read_trainer_log(Path("saves/demo"))
    loss_curves(rows)   # {"train": [(step, loss), ...], "eval": [(step, eval_loss), ...]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TRAINER_LOG = "trainer_log.jsonl"
TRAINER_STATE = "trainer_state.json"


def read_trainer_log(folder: str | Path, *, state_fallback: bool = True) -> list[dict[str, Any]]:
    """The rows of `folder/trainer_log.jsonl` (a line cut by a kill is skipped), else of trainer_state.json."""
    folder = Path(folder)
    log = folder / TRAINER_LOG
    if log.is_file():
        rows = []
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict):
                rows.append(row)
        return rows
    state = folder / TRAINER_STATE
    if state_fallback and state.is_file():
        try:
            history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
        except (json.JSONDecodeError, AttributeError, OSError):
            return []
        return [r for r in history if isinstance(r, dict)]
    return []


def loss_curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """`{"train": [(step, loss), ...], "eval": [...]}` from log rows; curves without points are left out."""
    curves: dict[str, list[tuple[float, float]]] = {"train": [], "eval": []}
    for i, row in enumerate(rows):
        step = row.get("step", row.get("current_steps", row.get("global_step", i + 1)))
        for key, curve in (("loss", "train"), ("train_loss", "train"), ("eval_loss", "eval")):
            value = row.get(key)
            if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
                curves[curve].append((float(step), float(value)))
                break
    return {k: v for k, v in curves.items() if v}
