"""Resident memory of a server under test: its process plus all its children (psutil).

`RssSampler(pid)` polls in a background thread while a scenario runs and keeps the peak; vLLM's
engine core and any worker processes are children, so they count too.
"""

from __future__ import annotations

import contextlib
import threading


def tree_rss(pid: int) -> int:
    """RSS in bytes of `pid` and its descendants; processes that vanish mid-read count as 0."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


class RssSampler:
    """Samples `tree_rss(pid)` every `interval_s` between `start()` and `stop()`; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = tree_rss(self.pid)
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling and return the peak RSS in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
