"""Read a style reference set: each row becomes the chat prompt before the last assistant turn and
that turn as the reference reply.

Reads whatever `llm-data` reads, through its readers and formats (`train.data`): alpaca, sharegpt
and OpenAI messages rows in JSON, JSONL, CSV or Parquet. When the file is registered in a
`dataset_info.json` beside it, that entry's column mapping is used (as LLaMA-Factory would);
otherwise the format is detected from the first row. Library code: raises `ReferenceDataError`
as `FILE:ROW: reason`.

    examples = read_reference_set(Path("configs/data/demo/huangdi_demo.json"), limit=20)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serve.cli_runner import UserError


class ReferenceDataError(UserError, ValueError):
    """The reference set cannot be used; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class ReferenceExample:
    """One prompt (chat messages ending with a user turn) and the reference reply to it."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    reference: str
    row: int  # row number in the source file (line number for JSONL)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def prompt(self) -> str:
        """The last user turn, for tables and the judge."""
        return next((c for r, c in reversed(self.messages) if r == "user"), "")


def read_reference_set(path: Path, limit: int | None = None) -> list[ReferenceExample]:
    """Read `path` into reference examples, in file order, at most `limit`."""
    from train.data.formats import RowError
    from train.data.readers import read_rows

    path = Path(path)
    if not path.is_file():
        raise ReferenceDataError(f"reference set {path} does not exist (give --data a dataset file)")
    result = read_rows(path)
    if result.problems:
        shown = "; ".join(str(p) for p in result.problems[:5])
        raise ReferenceDataError(f"{shown} (`llm-data validate {path}` lists every problem)")
    if not result.rows:
        raise ReferenceDataError(
            f"reference set {path} is empty: it needs rows in alpaca, sharegpt or OpenAI messages format "
            "(use the held-out split of the persona dataset)"
        )
    entry, fmt = _entry_and_format(path, result.rows[0])
    examples: list[ReferenceExample] = []
    for number, row in result.rows:
        try:
            sample = fmt.parse(row, entry)
        except (RowError, ValueError) as exc:
            raise ReferenceDataError(f"{path}:{number}: {exc}") from exc
        if not sample.response or not sample.response.strip():
            raise ReferenceDataError(
                f"{path}:{number}: no reference reply (format {fmt.name!r} has no response)"
            )
        turns = [("system", sample.system)] if sample.system else []
        turns += [(m["role"], m["content"]) for m in sample.messages]
        if not turns or turns[-1][0] != "user":
            raise ReferenceDataError(f"{path}:{number}: the reply must answer a user turn")
        examples.append(ReferenceExample(tuple(turns), sample.response, number))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _entry_and_format(path: Path, first: tuple[int, dict]):
    """The dataset_info.json entry registered for this file, else the format its first row shows."""
    from serve.artifacts.dataset_registry import DatasetEntry, DatasetInfoError, load_dataset_info
    from train.data.formats import detect_format, format_for_entry

    try:
        info = load_dataset_info(path.parent)
    except DatasetInfoError:
        info = {}
    for spec in info.values():
        if isinstance(spec, dict) and spec.get("file_name") == path.name:
            entry = DatasetEntry.from_info(spec)
            return entry, format_for_entry(entry, "sft")
    number, row = first
    try:
        fmt = detect_format(row)
    except ValueError as exc:
        raise ReferenceDataError(f"{path}:{number}: {exc}") from exc
    return fmt.default_entry(path.name, row), fmt
