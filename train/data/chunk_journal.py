"""Resumable per-chunk processing shared by `llm-data synth` and `llm-data extract-role --llm`.

For an output `OUT` the run keeps two files beside it until the final file is written:

- `OUT.state.json`: the settings fingerprint (text hash, chunking, model, prompts). A re-run with
  other settings is refused instead of mixing two datasets.
- `OUT.partial.jsonl`: one line per finished chunk (`chunk_id`, its rows, its counters), appended
  and fsync'd as each chunk finishes. A re-run skips every chunk already there, so a kill at any
  moment loses at most the chunks in flight and never duplicates one; a line torn by the kill is
  cut off on the next open.

`process_chunks` runs a per-chunk function over a thread pool with a progress bar, journals each
result, and stops scheduling new chunks at the first chunk that fails after the client's retries.
`write_rows` writes the final json/jsonl/parquet file atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from serve.atomic import atomic_path, write_text_atomic
from serve.cli_runner import UserError
from train.data.chunking import Chunk

OutputFormat = Literal["json", "jsonl", "parquet"]


class JournalMismatchError(UserError, RuntimeError):
    """The journal beside the output was written with other settings."""


class OutputExistsError(UserError, FileExistsError):
    """The output file exists and is not empty, and --overwrite was not given."""


@dataclass
class ChunkResult:
    """What one chunk produced: the rows kept and counters (kept, dropped by reason, tokens)."""

    chunk_id: str
    index: int
    rows: list[dict]
    stats: dict[str, int] = field(default_factory=dict)


class ChunkJournal:
    """The `OUT.partial.jsonl` + `OUT.state.json` pair of one run."""

    def __init__(self, out: Path, fingerprint: dict):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial.jsonl")
        self.state = self.out.with_name(self.out.name + ".state.json")
        self.fingerprint = fingerprint
        self._lock = threading.Lock()

    def open(self, restart: bool = False) -> dict[str, ChunkResult]:
        """Start or resume; returns the chunks already finished, by id."""
        if restart:
            self.discard()
        if self.state.exists():
            saved = json.loads(self.state.read_text(encoding="utf-8")).get("fingerprint", {})
            if saved != self.fingerprint:
                keys = sorted(
                    k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k)
                )
                raise JournalMismatchError(
                    f"{self.partial} was written with other settings ({', '.join(keys)} differ); re-run with "
                    "the same settings to resume, or pass --restart to start over"
                )
        else:
            self.partial.unlink(missing_ok=True)
            write_text_atomic(
                self.state, json.dumps({"fingerprint": self.fingerprint}, ensure_ascii=False, indent=1)
            )
        return self._read()

    def _read(self) -> dict[str, ChunkResult]:
        done: dict[str, ChunkResult] = {}
        if not self.partial.exists():
            return done
        raw = self.partial.read_bytes()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn by a kill mid-write
            try:
                rec = json.loads(line)
            except ValueError:
                break
            good_end += len(line)
            done.setdefault(
                rec["chunk_id"], ChunkResult(rec["chunk_id"], rec["index"], rec["rows"], rec["stats"])
            )
        if good_end < len(raw):
            with open(self.partial, "r+b") as f:
                f.truncate(good_end)
        return done

    def append(self, result: ChunkResult) -> None:
        line = json.dumps(
            {"chunk_id": result.chunk_id, "index": result.index, "rows": result.rows, "stats": result.stats},
            ensure_ascii=False,
        )
        with self._lock, open(self.partial, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)


@dataclass
class RunOutcome:
    results: dict[str, ChunkResult]  # every finished chunk, resumed ones included
    resumed: int  # chunks taken from the journal
    failed: list[tuple[Chunk, str]]  # chunks that failed this run, with the error
    not_started: int  # chunks not attempted because an earlier one failed
    run_stats: dict = field(default_factory=dict)  # this run's counters (requests, retries, ...)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.not_started

    def totals(self) -> Counter:
        total: Counter = Counter()
        for r in self.results.values():
            total.update(r.stats)
        return total

    def rows(self) -> list[dict]:
        return [row for r in sorted(self.results.values(), key=lambda r: r.index) for row in r.rows]


def process_chunks(
    chunks: list[Chunk],
    work: Callable[[Chunk], ChunkResult],
    journal: ChunkJournal,
    *,
    concurrency: int = 1,
    restart: bool = False,
    desc: str = "chunks",
    progress: bool = True,
) -> RunOutcome:
    """Run `work` on every chunk not yet in the journal, journaling each result as it finishes."""
    from tqdm import tqdm

    results = journal.open(restart=restart)
    known = {c.id for c in chunks}
    results = {k: v for k, v in results.items() if k in known}
    resumed = len(results)
    todo = [c for c in chunks if c.id not in results]
    failed: list[tuple[Chunk, str]] = []
    bar = tqdm(
        total=len(chunks), initial=resumed, desc=desc, unit="chunk", disable=not progress, dynamic_ncols=True
    )
    # Daemon threads rather than ThreadPoolExecutor: on Ctrl-C the process exits at once instead of
    # waiting for requests in flight (their chunks are simply not journaled and are redone on resume).
    pending: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def worker() -> None:
        while (chunk := pending.get()) is not None:
            try:
                done.put((chunk, work(chunk), None))
            except Exception as e:  # noqa: BLE001 - reported per chunk; the run stops scheduling
                done.put((chunk, None, f"{type(e).__name__}: {e}"))

    workers = max(1, min(concurrency, len(todo)))
    for _ in range(workers):
        threading.Thread(target=worker, daemon=True).start()
    feed = iter(todo)
    started = running = 0
    for chunk in feed:
        pending.put(chunk)
        started, running = started + 1, running + 1
        if running >= workers:
            break
    totals: Counter = Counter()
    for r in results.values():
        totals.update(r.stats)
    while running:
        try:
            chunk, result, error = done.get(timeout=0.5)
        except queue.Empty:
            continue
        running -= 1
        if error is not None:
            failed.append((chunk, error))
        else:
            journal.append(result)
            results[result.chunk_id] = result
            totals.update(result.stats)
            bar.update(1)
            bar.set_postfix(kept=totals.get("kept", 0), dropped=totals.get("dropped", 0), refresh=False)
        if not failed and (nxt := next(feed, None)) is not None:
            pending.put(nxt)
            started, running = started + 1, running + 1
    for _ in range(workers):
        pending.put(None)
    bar.close()
    return RunOutcome(results=results, resumed=resumed, failed=failed, not_started=len(todo) - started)


def infer_format(path: Path, fmt: str | None) -> OutputFormat:
    if fmt:
        return fmt  # type: ignore[return-value]
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("json", "jsonl", "parquet"):
        return suffix  # type: ignore[return-value]
    raise ValueError(
        f"cannot tell the output format from {path}; name it .json, .jsonl or .parquet or pass --format"
    )


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing output unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; --out names a file")
    if path.exists() and path.stat().st_size > 0 and not overwrite:
        raise OutputExistsError(f"{path} exists and is not empty; pass --overwrite to replace it")


def write_rows(rows: list[dict], path: Path, fmt: OutputFormat) -> None:
    """Write alpaca-style rows as json (one array), jsonl or parquet, atomically."""
    if fmt not in ("json", "jsonl", "parquet"):
        raise ValueError(f"unknown output format {fmt!r}")
    with atomic_path(path) as tmp:
        if fmt == "json":
            tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        elif fmt == "jsonl":
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        else:
            import pandas as pd

            pd.DataFrame(rows).to_parquet(tmp, index=False)
