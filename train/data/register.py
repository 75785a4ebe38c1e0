"""`llm-data register FILE --name NAME --dataset-dir DIR`: add or update one dataset_info.json entry.

The file is validated first (a file with problems is refused); the entry gets the `formatting`,
`ranking`, `columns` and `tags` LLaMA-Factory needs for its format; other entries are left untouched
and the file is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from serve.artifacts.dataset_registry import DatasetEntry, register_entries
from serve.cli_runner import UserError
from train.data.formats import FORMATS
from train.data.validate import parse_columns, validate_file


class RegisterError(UserError, ValueError):
    """The file cannot be registered; the message says why."""

    exit_code = 1


def register_dataset(
    file: str | Path,
    name: str,
    dataset_dir: str | Path,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> tuple[DatasetEntry, bool]:
    """Validate `file` and write its entry under `name`; returns the entry and whether it replaced one."""
    file, dataset_dir = Path(file), Path(dataset_dir)
    report = validate_file(file, fmt, columns=columns)
    if report.entry is not None and tags:
        report.entry.tags = dict(tags)
        report = validate_file(file, entry=report.entry)
    if not report.ok or report.entry is None:
        shown = "\n".join(str(p) for p in report.problems[:20])
        raise RegisterError(f"{file} has {len(report.problems)} problems; fix them first:\n{shown}")
    entry = report.entry
    entry.file_name = _file_name(file, dataset_dir)
    change = register_entries(dataset_dir, {name: entry})[name]
    return entry, change != "added"


def _file_name(file: Path, dataset_dir: Path) -> str:
    """Relative to the dataset dir when inside it (portable), else absolute (LLaMA-Factory joins paths)."""
    file_abs, dir_abs = file.resolve(), dataset_dir.resolve()
    if file_abs.is_relative_to(dir_abs):
        return file_abs.relative_to(dir_abs).as_posix()
    return os.fspath(file_abs)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("register", help="add a dataset to DIR/dataset_info.json", description=__doc__)
    p.add_argument("file", help="dataset file (.json, .jsonl, .csv, .parquet)")
    p.add_argument("--name", required=True, help="dataset name to use in `dataset:` of a training config")
    p.add_argument(
        "--dataset-dir", required=True, help="directory holding dataset_info.json (the config's dataset_dir)"
    )
    p.add_argument(
        "--format", default="auto", choices=["auto", *FORMATS], help="dataset format (default: auto)"
    )
    p.add_argument("--columns", help='column mapping, e.g. {"prompt": "instruction", "response": "output"}')
    p.add_argument(
        "--tags", help='role tags for sharegpt data, e.g. {"role_tag": "role", "content_tag": "content"}'
    )
    return p


def run(args: argparse.Namespace) -> int:
    tags = json.loads(args.tags) if args.tags else None
    entry, replaced = register_dataset(
        args.file, args.name, args.dataset_dir, args.format, parse_columns(args.columns), tags
    )
    verb = "updated" if replaced else "added"
    print(f"{verb} {args.name!r} in {Path(args.dataset_dir) / 'dataset_info.json'}:")
    print(json.dumps(entry.to_info(), ensure_ascii=False, indent=2))
    return 0
