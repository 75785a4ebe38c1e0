"""Training runs started from the chat page: one `llm-train` child process at a time, its state on disk.

    manager = RunManager([Path("saves")], on_finished=publish)
    manager.start(Path("saves"), "demo", cfg)     # RunRefused (with the reason) while another run is going
    manager.stop()                                # SIGTERM: llm-train saves a checkpoint and exits 130
    manager.resume()                              # `llm-train CONFIG --resume`

Each run started here keeps `ROOT/.llm-ui-runs/NAME/` (its config, llm-train's output, `run.json`), so
its state survives closing the page and restarting the server. llm-train trains in `ROOT/.NAME.partial/`
and renames it to `ROOT/NAME` only when complete, so a failed or stopped run never leaves a half-written
adapter. The child gets SIGTERM when the server process dies: a resumable checkpoint, as after Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from serve.artifacts.run_manifest import MANIFEST_FILE, ManifestError, read_manifest
from serve.artifacts.trainer_log import read_trainer_log
from serve.atomic import write_json_atomic
from train.run import last_complete_checkpoint, staging_dir
from ui.training.settings import check_name, config_yaml

RECORDS = ".llm-ui-runs"
RECORD_VERSION = 1
INTERRUPTED_EXIT = 130  # llm-train's status after a signal, with a checkpoint kept

Status = Literal["running", "stopping", "finished", "stopped", "failed", "interrupted"]
ACTIVE = ("running", "stopping")


class RunRefused(ValueError):
    """A start, stop or resume the manager will not do; the message says why and what to do instead."""


class RunRecord(BaseModel):
    """`run.json`: what the page knows about one run it started."""

    model_config = ConfigDict(extra="forbid")

    version: int = RECORD_VERSION
    name: str
    root: str
    status: Status
    started_at: float
    ended_at: float | None = None
    returncode: int | None = None
    pid: int | None = None
    resumes: int = 0
    overwrite: bool = False  # it replaces an adapter of the same name (the server must reload it)
    served_as: str | None = None  # the model id the server lists it under, once loaded
    serve_note: str | None = None  # why it is not served, when loading it failed

    @property
    def output_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def staging(self) -> Path:
        return staging_dir(self.output_dir)

    @property
    def record_dir(self) -> Path:
        return Path(self.root) / RECORDS / self.name

    @property
    def config_path(self) -> Path:
        return self.record_dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.record_dir / "llm-train.log"

    @property
    def resumable(self) -> bool:
        return self.status not in ACTIVE and self.status != "finished" and self._checkpoint() is not None

    def _checkpoint(self) -> Path | None:
        return last_complete_checkpoint(self.staging) if self.staging.is_dir() else None

    def run_dir(self) -> Path:
        """Where trainer_log.jsonl is: the staging dir while training, the output dir once published."""
        if self.status == "finished" or not self.staging.is_dir():
            return self.output_dir
        return self.staging

    def save(self) -> None:
        write_json_atomic(self.record_dir / "run.json", self.model_dump())


@dataclass
class Progress:
    """The latest trainer_log.jsonl row, and the loss curve so far (one value per step)."""

    step: int = 0
    total: int = 0
    throughput: float | None = None  # tokens/s
    elapsed: str | None = None
    remaining: str | None = None
    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


def read_progress(run_dir: Path) -> Progress:
    rows = read_trainer_log(run_dir, state_fallback=False)
    progress = Progress()
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for row in rows:
        step = int(row.get("current_steps") or 0)
        if row.get("loss") is not None:
            train[step] = float(row["loss"])  # a resumed run logs some steps again: keep the latest
        if row.get("eval_loss") is not None:
            evals[step] = float(row["eval_loss"])
    if rows:
        last = rows[-1]
        progress.step = int(last.get("current_steps") or 0)
        progress.total = int(last.get("total_steps") or 0)
        progress.throughput = last.get("throughput")
        progress.elapsed, progress.remaining = last.get("elapsed_time"), last.get("remaining_time")
    progress.train, progress.evals = sorted(train.items()), sorted(evals.items())
    return progress


@dataclass
class RunSummary:
    """One line of the runs list: a finished adapter (its manifest) or a run the page started."""

    name: str
    root: Path
    status: str
    base: str = ""
    stage: str = ""
    data: str = ""
    steps: int | None = None
    final_loss: float | None = None
    when: float = 0.0
    loss_png: Path | None = None

    @property
    def output_dir(self) -> Path:
        return self.root / self.name


class RunManager:
    """Starts, stops and resumes `llm-train` runs into the configured adapter roots, one at a time."""

    def __init__(
        self,
        roots: list[Path],
        *,
        on_finished: Callable[[RunRecord], tuple[str | None, str | None]] | None = None,
        command: list[str] | None = None,
    ):
        self.roots = list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))
        self.on_finished = on_finished
        self.command = command or [sys.executable, "-m", "train.cli"]  # llm-train, in this environment
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._current: RunRecord | None = None
        self._recover()

    # --- where runs may write -------------------------------------------------------------------
    def root(self, value: str | Path) -> Path:
        path = Path(value).expanduser().resolve()
        if path not in self.roots:
            raise RunRefused(
                f"{value} is not an adapter directory of this server ({', '.join(map(str, self.roots))}); "
                "start the server with --adapter-dir for it"
            )
        return path

    def output_dir(self, root: str | Path, name: str) -> Path:
        """`ROOT/NAME`, refused unless it stays inside ROOT (no `..`, no symlink out)."""
        base = self.root(root)
        target = base / check_name(name)
        if target.is_symlink() or not target.resolve().is_relative_to(base):
            raise RunRefused(f"{target} leads outside {base}; choose another output name")
        return target

    # --- the run ----------------------------------------------------------------------------------
    def current(self) -> RunRecord | None:
        """The run started last (running or not), re-read so a finished run shows its served name."""
        return self._current

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(
        self, root: str | Path, name: str, cfg: dict[str, Any], *, overwrite: bool = False
    ) -> RunRecord:
        output = self.output_dir(root, name)
        with self._lock:
            self._refuse_if_busy()
            staging = staging_dir(output)
            if output.exists() and any(output.iterdir()) and not overwrite:
                raise RunRefused(
                    f"{output} already holds an adapter; choose another output name or tick Overwrite "
                    "(the old one stays until the new run completes)"
                )
            if staging.is_dir() and last_complete_checkpoint(staging) is not None and not overwrite:
                raise RunRefused(
                    f"an interrupted run of {name} is in {staging}; Resume it, or tick Overwrite to start over"
                )
            record = RunRecord(
                name=output.name,
                root=str(output.parent),
                status="running",
                started_at=time.time(),
                overwrite=overwrite and output.exists(),
            )
            record.record_dir.mkdir(parents=True, exist_ok=True)
            cfg = {**cfg, "output_dir": str(output)}
            record.config_path.write_text(config_yaml(cfg, record.config_path), encoding="utf-8")
            record.log_path.write_text("", encoding="utf-8")
            args = [str(record.config_path), "--no-progress"] + (["--overwrite"] if overwrite else [])
            return self._launch(record, args)

    def resume(self, root: str | Path | None = None, name: str | None = None) -> RunRecord:
        with self._lock:
            self._refuse_if_busy()
            record = self._record(root, name) if name else self._current
            if record is None:
                raise RunRefused("no run to resume; start one first")
            if not record.resumable:
                raise RunRefused(
                    f"run {record.name} has no checkpoint to resume from ({record.status}); start it again"
                )
            record.status, record.resumes = "running", record.resumes + 1
            record.returncode = record.ended_at = None
            with open(record.log_path, "a", encoding="utf-8") as log:
                log.write(f"\n--- resumed at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
            return self._launch(record, [str(record.config_path), "--no-progress", "--resume"])

    def stop(self) -> RunRecord:
        """Ask llm-train to save a checkpoint after the current step and exit (SIGTERM, as on the command line)."""
        with self._lock:
            if not self.running() or self._current is None:
                raise RunRefused("no run is in progress")
            self._current.status = "stopping"
            self._current.save()
            self._proc.send_signal(signal.SIGTERM)
            return self._current

    def log_tail(self, record: RunRecord, lines: int = 25) -> str:
        if not record.log_path.is_file():
            return ""
        text = record.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def config_of(self, record: RunRecord) -> dict[str, Any]:
        try:
            data = yaml.safe_load(record.config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    # --- internals ---------------------------------------------------------------------------------
    def _refuse_if_busy(self) -> None:
        if self.running() and self._current is not None:
            step = read_progress(self._current.run_dir())
            where = f" (step {step.step}/{step.total})" if step.total else " (starting)"
            raise RunRefused(
                f"run {self._current.name} is still in progress{where}; one run at a time: Stop it or wait for it"
            )

    def _launch(self, record: RunRecord, args: list[str]) -> RunRecord:
        """Start llm-train from a thread that lives as long as the child (its death signal follows that thread)."""
        started = threading.Event()
        failure: list[OSError] = []

        def watch() -> None:
            try:
                with open(record.log_path, "ab") as log:
                    proc = subprocess.Popen(
                        [*self.command, *args],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                        preexec_fn=_child_setup,
                    )
            except OSError as exc:
                failure.append(exc)
                started.set()
                return
            self._proc = proc
            record.pid = proc.pid
            record.save()
            started.set()
            self._finished(record, proc.wait())

        self._current = record
        record.save()
        threading.Thread(target=watch, name=f"llm-train {record.name}", daemon=True).start()
        started.wait()
        if failure:
            record.status, record.ended_at = "failed", time.time()
            record.save()
            raise RunRefused(f"cannot start llm-train: {failure[0]}")
        return record

    def _finished(self, record: RunRecord, returncode: int) -> None:
        with self._lock:
            record.returncode, record.ended_at, record.pid = returncode, time.time(), None
            if returncode == 0:
                record.status = "finished"
            elif (
                returncode in (INTERRUPTED_EXIT, -signal.SIGTERM, -signal.SIGINT)
                or record.status == "stopping"
            ):
                record.status = "stopped"
            else:
                record.status = "failed"
            record.save()
            self._proc = None
        if record.status == "finished" and self.on_finished is not None:
            served_as, note = None, None
            try:
                served_as, note = self.on_finished(record)
            except Exception as exc:  # the run itself succeeded; say why it is not served
                note = f"{type(exc).__name__}: {exc}"
            # On disk first, then in memory: whoever sees `served_as` on the live record (the page's
            # poll, a test) finds it in run.json too.
            record.model_copy(update={"served_as": served_as, "serve_note": note}).save()
            record.served_as, record.serve_note = served_as, note

    def _record(self, root: str | Path | None, name: str) -> RunRecord:
        for record in self.records():
            if record.name == name and (root is None or Path(record.root) == self.root(root)):
                return record
        raise RunRefused(f"no run named {name} was started from this page")

    def records(self) -> list[RunRecord]:
        """Every run.json under the roots, newest first."""
        found = []
        for root in self.roots:
            for path in (root / RECORDS).glob("*/run.json"):
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if data.get("version", 0) > RECORD_VERSION:
                        continue  # written by a newer llm-serve: not ours to rewrite
                    found.append(RunRecord.model_validate(data))
                except (OSError, ValueError):
                    continue
        if self._current is not None:  # the live object, not its last save
            found = [self._current if r.record_dir == self._current.record_dir else r for r in found]
        return sorted(found, key=lambda r: r.started_at, reverse=True)

    def _recover(self) -> None:
        """Runs a previous server left marked running: their process is gone, so they were interrupted."""
        records = self.records()
        for record in records:
            if record.status in ACTIVE and not _alive(record.pid):
                record.status, record.pid = "interrupted", None
                record.save()
        self._current = records[0] if records else None

    def runs(self) -> list[RunSummary]:
        """Past and present runs under the roots: finished adapters with a manifest, and the page's runs."""
        summaries: dict[Path, RunSummary] = {}
        for root in self.roots:
            for manifest in sorted(root.glob(f"*/{MANIFEST_FILE}")):
                summary = _manifest_summary(manifest)
                if summary is not None:
                    summaries[summary.output_dir] = summary
        for record in self.records():
            known = summaries.get(record.output_dir)
            if known is not None and (record.status == "finished" or known.when >= record.started_at):
                continue
            cfg = self.config_of(record)
            progress = read_progress(record.run_dir())
            summaries[record.output_dir] = RunSummary(
                name=record.name,
                root=Path(record.root),
                status=record.status + (" (resumable)" if record.resumable else ""),
                base=str(cfg.get("model_name_or_path", "")),
                stage=str(cfg.get("stage", "")),
                data=str(cfg.get("dataset", "")),
                steps=progress.step or None,
                final_loss=progress.train[-1][1] if progress.train else None,
                when=record.started_at,
            )
        return sorted(summaries.values(), key=lambda s: s.when, reverse=True)


def _manifest_summary(path: Path) -> RunSummary | None:
    try:
        manifest = read_manifest(path.parent)
    except ManifestError:
        return None  # unreadable, or from a newer llm-serve: not listed
    if manifest is None:
        return None
    loss_png = path.parent / "loss.png"
    return RunSummary(
        name=path.parent.name,
        root=path.parent.parent,
        status="finished",
        base=manifest.base_model.name,
        stage=manifest.stage or "",
        data=", ".join(d.name for d in manifest.datasets),
        steps=manifest.metrics.get("steps"),
        final_loss=manifest.metrics.get("final_loss"),
        when=path.stat().st_mtime,
        loss_png=loss_png if loss_png.is_file() else None,
    )


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _child_setup() -> None:
    # Own process group: a Ctrl-C in the server's terminal does not reach llm-train directly; when the
    # server dies, llm-train gets SIGTERM and its worker checkpoints (PR_SET_PDEATHSIG follows the
    # thread that started it, which lives until the child exits).
    os.setpgrp()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
