"""Atomic file writes: a temporary file beside the target, renamed over it only when complete.

Used for every file a reader may look at while it is being written (manifests, dataset_info.json,
synthesised datasets, journals, benchmark results): a crash or Ctrl-C leaves the old file or none,
never half of one. Folders are published the same way by serve.artifacts.publish. Dependency-free so
any package of the project can use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` if the block succeeds, else vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, mode)  # mkstemp makes 0600; these files are meant to be read by others
        yield Path(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible: no empty file after a crash
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """`obj` as indented UTF-8 JSON (non-ASCII kept as is) plus a final newline."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2, **dumps_kwargs) + "\n")
