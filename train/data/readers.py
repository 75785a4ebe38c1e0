"""Read dataset files (json, jsonl, csv, parquet) into numbered rows, reporting problems as `FILE:ROW: reason`.

Rows are numbered from 1 in file order; for `.jsonl` the number is the line number. Broken input
(not UTF-8, bad JSON) becomes `Problem`s with the line and column, never an exception.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file; prints as `FILE:ROW: reason` (or `FILE: reason` for the whole file)."""

    file: str
    row: int | None
    reason: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f":{self.row}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.reason}"


@dataclass
class ReadResult:
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def read_rows(path: str | Path) -> ReadResult:
    """Read every row of `path`; unreadable parts become problems, readable rows are still returned."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        return ReadResult(problems=[Problem(name, None, "file not found")])
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        return ReadResult(
            problems=[
                Problem(name, None, f"unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
            ]
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        reason = f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); re-save the file as UTF-8"
        return ReadResult(problems=[Problem(name, line, reason)])
    text = text.removeprefix("\ufeff")
    if suffix == ".csv":
        return _read_csv(name, text)
    if suffix == ".jsonl":
        return _read_jsonl(name, text)
    return _read_json(name, text)


def _check_object(name: str, number: int, value: Any, result: ReadResult) -> None:
    if isinstance(value, dict):
        result.rows.append((number, value))
    else:
        result.problems.append(
            Problem(name, number, f"row is a {type(value).__name__}, expected a JSON object")
        )


def _read_json(name: str, text: str) -> ReadResult:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(name, text)  # JSON lines saved as .json, which LLaMA-Factory also accepts
        return ReadResult(problems=[Problem(name, exc.lineno, f"bad JSON: {exc.msg}", exc.colno)])
    result = ReadResult()
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        result.problems.append(Problem(name, None, "top level must be a JSON array of objects"))
        return result
    for number, value in enumerate(data, start=1):
        _check_object(name, number, value, result)
    return result


def _read_jsonl(name: str, text: str) -> ReadResult:
    result = ReadResult()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            result.problems.append(Problem(name, number, f"bad JSON: {exc.msg}", exc.colno))
            continue
        _check_object(name, number, value, result)
    return result


def _read_csv(name: str, text: str) -> ReadResult:
    result = ReadResult()
    reader = csv.DictReader(io.StringIO(text))
    try:
        for number, row in enumerate(reader, start=1):
            if None in row:
                result.problems.append(Problem(name, number, "more cells than header columns"))
                continue
            result.rows.append((number, dict(row)))
    except csv.Error as exc:
        result.problems.append(Problem(name, reader.line_num, f"bad CSV: {exc}"))
    return result


def _read_parquet(path: Path) -> ReadResult:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        return ReadResult(problems=[Problem(str(path), None, f"cannot read parquet: {exc}")])
    result = ReadResult()
    for number, row in enumerate(table.to_pylist(), start=1):
        result.rows.append((number, row))
    return result
