"""`llm-data validate FILE`: check every row of a dataset and print counts and token-length statistics.

Run as `llm-data validate data.json [--format auto|alpaca|sharegpt|openai|dpo|kto|pt] [--model default]`.
Each problem prints as `FILE:ROW: reason`; the exit status is 1 when there is any. `llm-train` runs the
same checks (`validate_file`) on every dataset of a config before the model loads.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.artifacts.dataset_registry import DatasetEntry
from train.data.formats import FORMATS, Format, RowError, Sample, detect_format, format_for_entry, get_format
from train.data.readers import Problem, read_rows


@dataclass
class Report:
    """What validating one file found: parsed samples by row number, and problems."""

    file: str
    format: str
    entry: DatasetEntry | None
    samples: list[tuple[int, Sample]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = {"rows": len(self.samples) + len({p.row for p in self.problems if p.row})}
        counts["valid"] = len(self.samples)
        counts["problems"] = len(self.problems)
        if self.samples and self.samples[0][1].text is None:
            counts["with_system"] = sum(1 for _, s in self.samples if s.system)
            counts["multi_turn"] = sum(1 for _, s in self.samples if len(s.messages) > 1)
        labels = Counter(s.label for _, s in self.samples if s.label is not None)
        if labels:
            counts["kto_desirable"], counts["kto_undesirable"] = labels[True], labels[False]
        return counts


def validate_file(
    path: str | Path,
    fmt: str = "auto",
    *,
    entry: DatasetEntry | None = None,
    columns: dict[str, str] | None = None,
    stage: str | None = None,
) -> Report:
    """Read and check every row. `entry` (from dataset_info.json) wins over `fmt`/`columns` when given."""
    path = Path(path)
    read = read_rows(path)
    report = Report(file=str(path), format=fmt, entry=entry, problems=list(read.problems))
    if not read.rows:
        if not read.problems:
            report.problems.append(Problem(str(path), None, "no rows"))
        return report
    # The union of all rows' columns (first value wins): an optional column may be absent from row 1.
    first: dict[str, Any] = {}
    for _, row in read.rows:
        for key, value in row.items():
            first.setdefault(key, value)
    try:
        chosen: Format = (
            format_for_entry(entry, stage)
            if entry is not None
            else (detect_format(first, columns) if fmt == "auto" else get_format(fmt))
        )
    except ValueError as exc:
        report.problems.append(Problem(str(path), None, str(exc)))
        return report
    if entry is None:
        entry = chosen.default_entry(path.name, first)
        if columns:
            entry.columns = dict(columns)
    report.format, report.entry = chosen.name, entry
    for number, row in read.rows:
        try:
            report.samples.append((number, chosen.parse(row, entry)))
        except RowError as exc:
            report.problems.append(Problem(str(path), number, str(exc)))
    report.problems.sort(key=lambda p: p.row or 0)
    return report


def sample_text(sample: Sample, tokenizer: Any) -> str:
    """The text a sample becomes under the tokenizer's chat template (plain text for pretrain).

    Tool rows go through the template's own tool rendering when it has one, else LLaMA-Factory's
    default tool format (what LLaMA-Factory trains such templates with)."""
    if sample.text is not None:
        return sample.text
    if sample.has_tools:
        from serve.tools.render import llamafactory_support, render_messages, tool_support

        support = tool_support(tokenizer.chat_template)
        if not support.native:
            support = llamafactory_support("default", None)
        messages, tools = render_messages(sample.conversation(), sample.tools, support)
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    return tokenizer.apply_chat_template(sample.conversation(), tokenize=False)


def token_stats(samples: list[Sample], tokenizer: Any, cutoff_len: int | None = None) -> dict[str, Any]:
    """Token lengths of the rendered samples: min, mean, median, p95, max, and how many exceed cutoff_len."""
    if not samples:
        return {}
    texts = [sample_text(s, tokenizer) for s in samples]
    lengths = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    stats: dict[str, Any] = {
        "min": lengths[0],
        "mean": round(statistics.fmean(lengths), 1),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        "max": lengths[-1],
        "total": sum(lengths),
    }
    if cutoff_len:
        stats["cutoff_len"] = cutoff_len
        stats["over_cutoff"] = sum(1 for n in lengths if n > cutoff_len)
    return stats


def load_tokenizer(model: str) -> Any:
    """The tokenizer of `model` (`default`, a checkpoint dir or .gguf), offline."""
    from transformers import AutoTokenizer

    from serve.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model).path))


def parse_columns(text: str | None) -> dict[str, str] | None:
    """`--columns '{"prompt": "instruction", ...}'` as a dict; raises ValueError naming the problem."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--columns is not valid JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('--columns must be a JSON object of strings, e.g. {"prompt": "question"}')
    return value


def print_report(report: Report, *, max_errors: int, stats: dict[str, Any] | None = None) -> None:
    for problem in report.problems[:max_errors]:
        print(problem)
    if len(report.problems) > max_errors:
        print(f"... and {len(report.problems) - max_errors} more problems")
    counts = ", ".join(f"{k} {v}" for k, v in report.counts().items())
    print(f"{report.file}: format {report.format}; {counts}")
    if stats:
        line = f"tokens per row: min {stats['min']}, mean {stats['mean']}, p50 {stats['p50']}, "
        line += f"p95 {stats['p95']}, max {stats['max']}, total {stats['total']}"
        if "over_cutoff" in stats:
            line += f"; {stats['over_cutoff']} rows longer than cutoff_len {stats['cutoff_len']}"
        print(line)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("validate", help="check every row of a dataset file", description=__doc__)
    p.add_argument("file", help="dataset file (.json, .jsonl, .csv, .parquet)")
    p.add_argument(
        "--format", default="auto", choices=["auto", *FORMATS], help="dataset format (default: auto)"
    )
    p.add_argument("--columns", help='column mapping as in dataset_info.json, e.g. {"prompt": "question"}')
    p.add_argument("--model", default="default", help="tokenizer for length statistics; `none` to skip")
    p.add_argument("--cutoff-len", type=int, help="count rows longer than this many tokens")
    p.add_argument("--max-errors", type=int, default=50, help="print at most this many problems")
    return p


def run(args: argparse.Namespace) -> int:
    report = validate_file(args.file, args.format, columns=parse_columns(args.columns))
    stats = None
    if report.samples and args.model.lower() != "none":
        stats = token_stats([s for _, s in report.samples], load_tokenizer(args.model), args.cutoff_len)
    print_report(report, max_errors=args.max_errors, stats=stats)
    return 0 if report.ok else 1
