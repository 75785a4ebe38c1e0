"""Write an evaluation's outputs: results.json, report.md, report.html and PNG plots.

Plots (matplotlib, Agg backend): task metrics per target side by side with 95% intervals, style
metrics per target, throughput, and each adapter's training loss curve when its folder has
LLaMA-Factory's trainer log (serve.artifacts.trainer_log). The HTML embeds the same PNG files.

    write_report(results, out_dir)   # results: the dict `eval.cli` builds
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from serve.artifacts.trainer_log import loss_curves, read_trainer_log
from serve.atomic import write_json_atomic, write_text_atomic

STYLE_PLOT_METRICS = ("chrf", "rouge_l", "embedding_sim", "style_proba", "distinct_2", "length_ratio")
STYLE_LABELS = {
    "chrf": "chrF (0-100)",
    "rouge_l": "ROUGE-L F1",
    "embedding_sim": "embedding cosine",
    "style_proba": "P(reference style)",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "length_ratio": "length ratio",
    "mean_tokens": "mean tokens",
    "reward": "reward model score",
}


def loss_history(adapter_path: Path | None) -> dict[str, list[tuple[float, float]]]:
    """`{"train": [(step, loss), ...], "eval": [...]}` from the adapter folder's trainer log, if any."""
    return loss_curves(read_trainer_log(adapter_path)) if adapter_path is not None else {}


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """Write results.json, report.md, report.html and plots into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out)
    results.setdefault("files", {})["plots"] = [p.name for p in plots.values()]
    paths = {"results": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_json_atomic(paths["results"], results, default=str)
    write_text_atomic(paths["markdown"], render_markdown(results, plots))
    write_text_atomic(paths["html"], render_html(results, plots))
    return paths


def _primary_metric(task: dict) -> str | None:
    better = task.get("higher_is_better") or {}
    for name in list(better) + list(task["metrics"]):
        if name in task["metrics"] and name != "sample_len":
            return name
    return None


def _plots(results: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["name"] for t in results["targets"]]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    plots: dict[str, Path] = {}

    task_names = sorted({task for per in results.get("tasks", {}).values() for task in per})
    if task_names:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(task_names) * max(1, len(names)) / 2), 3.5))
        width = 0.8 / len(names)
        for j, target in enumerate(names):
            xs, ys, errs = [], [], []
            for i, task in enumerate(task_names):
                info = results["tasks"].get(target, {}).get(task)
                metric = _primary_metric(info) if info else None
                if metric:
                    m = info["metrics"][metric]
                    ci = m.get("ci95") or [m["value"], m["value"]]
                    xs.append(i + j * width)
                    ys.append(m["value"])
                    errs.append([m["value"] - ci[0], ci[1] - m["value"]])
            yerr = list(zip(*errs, strict=True)) if errs else None
            ax.bar(xs, ys, width, yerr=yerr, capsize=3, label=target, color=colors[target])
        labels = []
        for task in task_names:
            info = next(
                (results["tasks"][t][task] for t in names if task in results["tasks"].get(t, {})), None
            )
            labels.append(f"{task}\n({_primary_metric(info)})" if info else task)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(task_names))], labels)
        ax.set_ylim(0, 1.05)
        ax.set_title("Task quality (95% CI)")
        ax.legend(fontsize=8)
        plots["tasks"] = _save(fig, out / "tasks.png")

    style = results.get("style", {}).get("targets", {})
    metrics = [m for m in STYLE_PLOT_METRICS if any(m in v for v in style.values())]
    if metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(2.4 * len(metrics), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            vals, errs = [], []
            for target in names:
                m = style.get(target, {}).get(metric, {})
                v = m.get("mean", m.get("value", float("nan")))
                vals.append(v)
                ci = m.get("ci95")
                errs.append([v - ci[0], ci[1] - v] if ci else [0, 0])
            ax.bar(
                range(len(names)),
                vals,
                yerr=list(zip(*errs, strict=True)),
                capsize=3,
                color=[colors[n] for n in names],
            )
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
            ax.set_title(STYLE_LABELS.get(metric, metric), fontsize=9)
            if metric == "length_ratio":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        fig.suptitle("Style against the references (95% CI)")
        plots["style"] = _save(fig, out / "style.png")

    curves = {t["name"]: t["loss"] for t in results["targets"] if t.get("loss")}
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, curve in curves.items():
            for kind, points in curve.items():
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    label=f"{name} {kind}",
                    color=colors[name],
                    ls="-" if kind == "train" else "--",
                    marker="" if len(points) > 20 else ".",
                )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training loss (from trainer_log.jsonl)")
        ax.legend(fontsize=8)
        plots["loss"] = _save(fig, out / "loss.png")

    thr = results.get("throughput", {})
    if thr:
        fig, ax = plt.subplots(figsize=(5, 3))
        stages = sorted({s for v in thr.values() for s in v if s != "load"})
        width = 0.8 / max(1, len(stages))
        for j, stage in enumerate(stages):
            vals = [thr.get(n, {}).get(stage, {}).get("samples_per_s", 0) for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=stage)
        ax.set_xticks([i + width * (len(stages) - 1) / 2 for i in range(len(names))], names)
        ax.set_ylabel("samples/s (uncached)")
        ax.set_title("Evaluation throughput")
        ax.legend(fontsize=8)
        plots["throughput"] = _save(fig, out / "throughput.png")
    plt.close("all")
    return plots


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _fmt(m: dict | None) -> str:
    if not m:
        return "–"
    v = m.get("mean", m.get("value"))
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    ci = m.get("ci95")
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _tables(results: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table, shared by markdown and HTML."""
    names = [t["name"] for t in results["targets"]]
    tables = [
        (
            "Targets",
            ["target", "kind", "what"],
            [[t["name"], t["kind"], t["what"]] for t in results["targets"]],
            "",
        )
    ]
    per = results.get("tasks", {})
    rows = []
    for task in sorted({task for v in per.values() for task in v}):
        info = next(per[n][task] for n in names if task in per.get(n, {}))
        for metric in info["metrics"]:
            if metric == "sample_len":
                continue
            rows.append(
                [task, metric, str(info["n"])]
                + [_fmt(per.get(n, {}).get(task, {}).get("metrics", {}).get(metric)) for n in names]
            )
    if rows:
        tables.append(
            (
                "Task quality",
                ["task", "metric", "n"] + names,
                rows,
                "value [95% CI: Wilson for proportions, else 1.96 x lm-eval's stderr]",
            )
        )
    style = results.get("style", {})
    if style.get("targets"):
        keys = [k for k in STYLE_LABELS if any(k in v for v in style["targets"].values())]
        rows = [[STYLE_LABELS[k]] + [_fmt(style["targets"].get(n, {}).get(k)) for n in names] for k in keys]
        ref = style.get("reference", {})
        for row, k in zip(rows, keys, strict=True):
            row.append(f"{ref[k]:.3f}" if k in ref else "")
        clf = style.get("classifier")
        note = f"n = {style.get('n', '?')} reference replies; mean [bootstrap 95% CI]."
        if clf:
            note += f" Style classifier: {clf['kind']}, {clf['cv_folds']}-fold CV accuracy {clf['cv_accuracy']:.3f}."
        if style.get("embedding_skipped"):
            note += f" Embedding similarity skipped: {style['embedding_skipped']}."
        tables.append(("Style", ["metric"] + names + ["reference"], rows, note))
    judge = results.get("judge")
    if judge:
        rows = [
            [n, f"{v['win_rate']:.3f}", str(v["wins"]), str(v["ties"]), str(v["losses"]), str(v["n"])]
            for n, v in judge["targets"].items()
        ]
        tables.append(
            (
                "LLM judge (pairwise vs base)",
                ["target", "win rate", "wins", "ties", "losses", "n"],
                rows,
                judge.get("question", ""),
            )
        )
    thr = results.get("throughput", {})
    rows = []
    for n in names:
        for stage, v in thr.get(n, {}).items():
            rows.append(
                [
                    n,
                    stage,
                    str(v["samples"]),
                    f"{v['seconds']:.1f}",
                    f"{v['samples_per_s']:.2f}",
                    str(v.get("cached", 0)),
                ]
            )
    if rows:
        tables.append(
            (
                "Throughput",
                ["target", "stage", "samples", "seconds", "samples/s", "cached"],
                rows,
                "cached samples are excluded from samples/s",
            )
        )
    return tables


def render_markdown(results: dict, plots: dict[str, Path]) -> str:
    meta = results.get("meta", {})
    lines = [
        f"# llm-eval report: {meta.get('title', 'evaluation')}",
        "",
        f"Created {meta.get('created', '')}; seed {meta.get('seed')}, limit {meta.get('limit')}.",
        "",
    ]
    for title, header, rows, note in _tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += ["", note, ""] if note else [""]
    for name, path in plots.items():
        lines += [f"![{name}]({path.name})", ""]
    samples = results.get("files", {}).get("samples", [])
    if samples:
        lines += ["## Samples", ""] + [f"- [{s}]({s})" for s in samples] + [""]
    return "\n".join(lines)


def render_html(results: dict, plots: dict[str, Path]) -> str:
    meta = results.get("meta", {})
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>llm-eval: {esc(str(meta.get('title', '')))}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}th{background:#f4f4f4}img{max-width:100%}"
        ".note{color:#555;font-size:13px}</style></head><body>",
        f"<h1>llm-eval report: {esc(str(meta.get('title', 'evaluation')))}</h1>",
        f"<p class='note'>Created {esc(str(meta.get('created', '')))}; seed {esc(str(meta.get('seed')))}, limit {esc(str(meta.get('limit')))}.</p>",
    ]
    for title, header, rows, note in _tables(results):
        parts.append(
            f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
        )
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>" + (f"<p class='note'>{esc(note)}</p>" if note else ""))
    for name, path in plots.items():
        parts.append(f"<h3>{esc(name)}</h3><img src='{esc(path.name)}' alt='{esc(name)}'>")
    samples = results.get("files", {}).get("samples", [])
    if samples:
        parts.append(
            "<h2>Samples</h2><ul>"
            + "".join(f"<li><a href='{esc(s)}'>{esc(s)}</a></li>" for s in samples)
            + "</ul>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
