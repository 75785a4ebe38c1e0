"""Draw the loss curve (training loss per logged step, eval loss where evaluated) into a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(log: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Write `path` from trainer_log.jsonl rows; returns None when there is nothing to plot."""
    train = [(r["current_steps"], r["loss"]) for r in log if r.get("loss") is not None]
    evals = [(r["current_steps"], r["eval_loss"]) for r in log if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
