"""HTML for the Train tab: the dataset preview, the progress bar, the loss curve (inline SVG), run status.

Everything is escaped here; the curve is drawn as SVG in the page (no plotting library, nothing
fetched), one `<circle data-step=...>` per logged point, so a test can count the points as they arrive.
"""

from __future__ import annotations

import html
import time

from train.data.preview import Preview
from ui.training.runs import Progress, RunRecord

CSS = """
#train-preview .row { border: 1px solid #e5e7eb; border-radius: 8px; margin: 8px 0; padding: 8px 10px; }
#train-preview .row-head { font-size: 0.85rem; color: #4b5563; margin-bottom: 4px; }
#train-preview pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.85rem; }
#train-preview .masked { color: #6b7280; }
#train-preview .trained { background: #dcfce7; color: #14532d; border-bottom: 2px solid #16a34a; }
#train-preview .problems { background: #fde8e8; border: 1px solid #f05252; color: #771d1d; border-radius: 8px;
                           padding: 8px 12px; font-size: 0.85rem; }
#train-preview .problems code { white-space: pre-wrap; }
.train-bar { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
.train-bar > div { height: 100%; background: #6366f1; }
.train-status { border-radius: 8px; padding: 8px 12px; font-size: 0.9rem; }
.train-status.running, .train-status.stopping { background: #eef2ff; border: 1px solid #6366f1; }
.train-status.finished { background: #ecfdf5; border: 1px solid #10b981; }
.train-status.failed, .train-status.refused { background: #fde8e8; border: 1px solid #f05252; color: #771d1d; }
.train-status.stopped, .train-status.interrupted { background: #fffbeb; border: 1px solid #f59e0b; }
.train-status pre { white-space: pre-wrap; font-size: 0.8rem; max-height: 320px; overflow: auto; }
"""

MAX_PROBLEMS = 30


def preview_html(preview: Preview | None, note: str = "") -> str:
    if preview is None:
        return f"<p>{html.escape(note or 'Pick a dataset to see its first rows as the trainer will.')}</p>"
    out = []
    if preview.problems:
        shown = "<br>".join(f"<code>{html.escape(p)}</code>" for p in preview.problems[:MAX_PROBLEMS])
        more = len(preview.problems) - MAX_PROBLEMS
        tail = f"<br>… and {more} more" if more > 0 else ""
        out.append(
            f'<div class="problems" role="alert"><b>{len(preview.problems)} problem(s): fix them to start a run</b>'
            f"<br>{shown}{tail}</div>"
        )
    name = html.escape(preview.dataset or preview.file)
    out.append(
        f'<p class="summary">{name}: format {html.escape(preview.format)}, {preview.valid_rows} of '
        f"{preview.total_rows} rows valid · stage {html.escape(preview.stage)} · template "
        f"<code>{html.escape(preview.template or '?')}</code> · cutoff_len {preview.cutoff_len}. "
        '<span class="trained">Highlighted</span> tokens carry the loss; the rest is masked.</p>'
    )
    if preview.packed:
        out.append(f"<p>The trainer packs rows into blocks of {preview.cutoff_len} tokens.</p>")
    for row in preview.rows:
        for part in row.parts:
            label = "" if row.kto_label is None else (" · desirable" if row.kto_label else " · undesirable")
            cut = f" · cut from {part.full_length}" if part.truncated else ""
            text = "".join(
                f'<span class="{"trained" if s.trained else "masked"}">{html.escape(s.text)}</span>'
                for s in part.spans
            )
            out.append(
                f'<div class="row" data-row="{row.row}" data-part="{part.part}" data-tokens="{part.tokens}" '
                f'data-trained="{part.trained}"><div class="row-head">row {row.row} · {part.part}: '
                f"{part.tokens} tokens, {part.trained} carry the loss{label}{cut}</div><pre>{text}</pre></div>"
            )
    return "\n".join(out)


def progress_html(progress: Progress, record: RunRecord | None) -> str:
    if record is None:
        return ""
    if not progress.total:
        waiting = "loading the model and data…" if record.status == "running" else ""
        return f'<div class="train-bar"><div style="width:0%"></div></div><p>{waiting}</p>'
    facts = [f"step {progress.step}/{progress.total}"]
    if progress.throughput:
        facts.append(f"{progress.throughput:.1f} tokens/s")
    if progress.elapsed:
        facts.append(f"elapsed {progress.elapsed}")
    if progress.remaining and record.status == "running":
        facts.append(f"ETA {progress.remaining}")
    if progress.train:
        facts.append(f"loss {progress.train[-1][1]:.4f}")
    if progress.evals:
        facts.append(f"eval loss {progress.evals[-1][1]:.4f}")
    width = f"{100 * progress.fraction:.1f}%"
    return (
        f'<div class="train-bar" role="progressbar" aria-valuenow="{progress.step}" '
        f'aria-valuemax="{progress.total}"><div style="width:{width}"></div></div>'
        f'<p id="train-progress-text">{html.escape(" · ".join(facts))}</p>'
    )


def loss_svg(progress: Progress, width: int = 640, height: int = 260) -> str:
    """Train loss as a blue line, eval loss as orange points; axes labelled with steps and loss."""
    points = progress.train + progress.evals
    if not points:
        return '<p class="no-curve">The loss curve appears with the first logged step.</p>'
    left, right, top, bottom = 56, 16, 16, 36
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    s_lo, s_hi = min(steps), max(max(steps), progress.total or 0, min(steps) + 1)
    v_lo, v_hi = min(losses), max(losses)
    pad = (v_hi - v_lo) * 0.1 or 0.1
    v_lo, v_hi = v_lo - pad, v_hi + pad

    def x(step: float) -> float:
        return left + (step - s_lo) / (s_hi - s_lo) * (width - left - right)

    def y(value: float) -> float:
        return top + (v_hi - value) / (v_hi - v_lo) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
        f'role="img" aria-label="loss curve" style="max-width:{width}px">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="#fafafa" stroke="#d1d5db"/>',
    ]
    for i in range(5):
        value = v_lo + (v_hi - v_lo) * i / 4
        parts.append(
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" font-size="11" text-anchor="end" fill="#4b5563">'
            f"{value:.3g}</text>"
        )
    for step in sorted({s_lo, (s_lo + s_hi) // 2, s_hi}):
        parts.append(
            f'<text x="{x(step):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle" '
            f'fill="#4b5563">{step}</text>'
        )
    parts.append(
        f'<text x="{(left + width) / 2}" y="{height - 4}" font-size="11" text-anchor="middle">step</text>'
    )
    for series, color, kind in ((progress.train, "#4f46e5", "train"), (progress.evals, "#ea580c", "eval")):
        if len(series) > 1 and kind == "train":
            path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in series)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s, v in series:
            parts.append(
                f'<circle class="{kind}-point" data-step="{s}" data-loss="{v:.5f}" cx="{x(s):.1f}" cy="{y(v):.1f}" '
                f'r="{3 if kind == "train" else 4}" fill="{color}"><title>{kind} loss {v:.4f} at step {s}</title>'
                "</circle>"
            )
    parts.append(
        f'<text x="{width - right - 4}" y="{top + 14}" font-size="11" text-anchor="end">'
        f'<tspan fill="#4f46e5">● train</tspan> <tspan fill="#ea580c">● eval</tspan></text></svg>'
    )
    return "".join(parts)


STATUS_TEXT = {
    "running": "Training",
    "stopping": "Stopping after the current step (saving a checkpoint)…",
    "finished": "Finished",
    "stopped": "Stopped",
    "failed": "Failed",
    "interrupted": "Interrupted (the server stopped while it ran)",
}


def status_html(record: RunRecord | None, log_tail: str = "", refused: str = "") -> str:
    if refused:
        return (
            f'<div class="train-status refused" role="alert"><b>Not started:</b> {html.escape(refused)}</div>'
        )
    if record is None:
        return '<div class="train-status">No run yet. Pick a dataset, check the preview, press Start.</div>'
    lines = [f"<b>{STATUS_TEXT[record.status]}</b> · <code>{html.escape(str(record.output_dir))}</code>"]
    if record.started_at:
        lines.append(f"started {time.strftime('%H:%M:%S', time.localtime(record.started_at))}")
    if record.status == "finished":
        if record.served_as:
            lines.append(
                f"served as <code>{html.escape(record.served_as)}</code>: pick it in Chat or open A/B"
            )
        elif record.serve_note:
            lines.append(f"not served: {html.escape(record.serve_note)}")
        else:
            lines.append("loading it into the server…")
    if record.status in ("stopped", "interrupted"):
        lines.append(
            "a checkpoint was kept: Resume continues it"
            if record.resumable
            else "no checkpoint was completed: Start it again"
        )
    body = " · ".join(lines)
    if record.status == "failed" and log_tail:
        body += f"<br>Last lines of <code>{html.escape(str(record.log_path))}</code>:<pre>{html.escape(log_tail)}</pre>"
    return f'<div class="train-status {record.status}" data-status="{record.status}">{body}</div>'
