"""Run the training command (one worker, or torchrun and its ranks) with a progress bar and a clean stop.

The command runs in a process group of its own, so a terminal Ctrl-C reaches only `llm-train`, which
turns it into a stop request: it writes the worker's stop file into the run directory (every rank
sees it and they agree at the next step boundary to save a checkpoint and stop) and, for a single
worker, also sends it one SIGTERM. torchrun is not signalled on the first request because it would
give its ranks only 30 s before killing them; a second request sends SIGTERM (torchrun forwards it),
a third SIGKILLs the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from train.worker import PARENT_DIED, STOP_FILE


@dataclass
class Outcome:
    returncode: int
    stop_requests: int
    seconds: float


def run_supervised(
    argv: list[str],
    env: dict[str, str],
    *,
    log_path: Path,
    run_dir: Path,
    distributed: bool,
    progress: bool,
    pass_fds: tuple[int, ...] = (),
) -> Outcome:
    """Run `argv` to completion, logging to `log_path` and showing `run_dir/trainer_log.jsonl` progress.

    `pass_fds` stay open in the child (llm-train's lock on the staging dir, held until the worker exits)."""
    from train.progress import ProgressBar, TrainerLogTail

    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
            pass_fds=pass_fds,
        )
        stops = 0

        def request_stop(signum, frame):
            nonlocal stops
            stops += 1
            if stops == 1:
                run_dir.mkdir(parents=True, exist_ok=True)
                stop_file.write_text(f"signal {signum}\n")
                if not distributed:
                    proc.send_signal(signal.SIGTERM)
            elif stops == 2:
                _signal_group(proc, signal.SIGTERM if distributed else signal.SIGINT)
            else:
                _signal_group(proc, signal.SIGKILL)

        old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = ProgressBar(enabled=progress)
        tail = TrainerLogTail(run_dir / "trainer_log.jsonl")
        try:
            while proc.poll() is None:
                for row in tail.read_new():
                    bar.update(row)
                time.sleep(0.5)
            for row in tail.read_new():
                bar.update(row)
        finally:
            bar.close()
            for s, handler in old.items():
                signal.signal(s, handler)
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            stop_file.unlink(missing_ok=True)
    return Outcome(proc.returncode, stops, time.monotonic() - started)


def log_excerpt(log: Path, lines: int = 25) -> str:
    """The first Python traceback in the log (under torchrun the last lines are only its summary of
    which rank failed), else the log's last lines."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    launches = [i for i, line in enumerate(text) if line.startswith("$ ")]
    text = text[launches[-1] :] if launches else text  # this launch only, not an earlier interrupted one
    start = next((i for i, line in enumerate(text) if "Traceback (most recent call last)" in line), None)
    if start is not None:
        end = next(
            (j + 1 for j in range(start + 1, len(text)) if _is_last_traceback_line(text[j])),
            len(text),
        )
        return f"the first error in {log}:\n" + "\n".join(text[start:end][-lines:])
    return f"last lines of {log}:\n" + "\n".join(text[-lines:])


def _is_last_traceback_line(line: str) -> bool:
    """The exception line ends a traceback; torchrun prefixes each rank's lines with `[rankN]: `."""
    if line.startswith("[rank") and "]: " in line:
        line = line.split("]: ", 1)[1]
    return bool(line) and not line.startswith((" ", "\t", "Traceback"))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _child_setup() -> None:
    os.setpgrp()
    try:  # Linux: if llm-train dies (even by SIGKILL) the child gets PARENT_DIED and checkpoints
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, PARENT_DIED)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
