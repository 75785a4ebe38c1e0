"""Adapter directories: every complete LoRA adapter below an `--adapter-dir` root, served by its path
relative to the root, and the rule that keeps runtime loading inside those roots.

    roots = AdapterRoots(["saves"])
    roots.scan()                       # {"huangdi": Path(".../saves/huangdi"), "persona/v2": ...}
    roots.find("persona/v2")           # the adapter folder, or AdapterMissing
    roots.contain("saves/persona/v2")  # a `lora_path` from POST /v1/load_lora_adapter, checked

A complete adapter is a folder holding `adapter_config.json` and `adapter_model.safetensors`
(serve.artifacts.model_folder says what an adapter folder holds and reads it; this module only
decides which folders are served and that they stay inside their root).
Folders whose name starts with "." or ends with ".partial" are never served or searched:
`llm-train` trains into `.NAME.partial/` and renames it into place when done, so a half-written
adapter is never seen. Every path is resolved (symlinks, `..`) before it is compared with the
resolved roots, and so is every file of an adapter folder that serving reads: a symlinked folder or
file pointing outside every root is refused, whatever the name looks like. Pure path logic: no torch.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from serve.adapters import AdapterConflict, AdapterError, AdapterInvalid, AdapterMissing, AdapterPathError
from serve.artifacts.model_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLED_ADAPTER_WEIGHTS,
    is_adapter_folder,
    read_files,
)

logger = logging.getLogger(__name__)

#: One component of an adapter name: no hidden or staging folders, nothing a shell or URL mangles.
COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
MAX_DEPTH = 4  # `persona/v2/run3/final` at most: a scan never walks a whole disk
SCAN_TTL = 1.0  # seconds a listing is reused: /v1/models may be polled by every open chat page


@dataclass(frozen=True)
class Located:
    """An adapter folder found inside a root: `name` is its path relative to `root`."""

    name: str
    path: Path  # resolved
    root: Path  # resolved


def staging(name: str) -> bool:
    return name.startswith(".") or name.endswith(".partial")


def check_name(name: str) -> None:
    """An adapter name as served from a directory: `a`, `persona/v2` (relative, no hidden parts)."""
    parts = name.split("/")
    if not name or len(parts) > MAX_DEPTH or not all(COMPONENT_RE.match(p) and not staging(p) for p in parts):
        raise AdapterMissing(
            f"`{name}` is not an adapter name: use the adapter's folder path relative to its --adapter-dir "
            "(letters, digits, '.', '_', '-', parts joined by '/', no hidden or .partial folders)"
        )


def fingerprint(path: Path) -> tuple:
    """Changes whenever the adapter is rewritten or renamed into place (inode, size, mtime)."""
    out = []
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        st = os.stat(path / name)
        out += [st.st_ino, st.st_size, st.st_mtime_ns]
    return tuple(out)


class AdapterRoots:
    """The `--adapter-dir` roots, in the order given (the first root wins a name found twice)."""

    def __init__(self, roots: Iterable[str | Path]):
        self.given = [str(r) for r in roots]
        self.roots = [Path(os.path.realpath(Path(r).expanduser())) for r in self.given]
        self._cache: tuple[float, dict[str, Located]] | None = None
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.roots)

    def describe(self) -> str:
        return ", ".join(self.given) or "none"

    def check_exist(self) -> None:
        """At start-up: every root is an existing directory (it may be empty)."""
        for given, root in zip(self.given, self.roots, strict=True):
            if not root.is_dir():
                raise AdapterError(
                    f"--adapter-dir {given}: not a directory; create it (mkdir -p {given}) or point "
                    "--adapter-dir at the folder llm-train writes adapters into (e.g. saves/)"
                )

    # ---------------------------------------------------------------- listing

    def scan(self, *, fresh: bool = False) -> dict[str, Located]:
        """Every complete adapter below every root, by name (cached for `SCAN_TTL` seconds)."""
        now = time.monotonic()
        if not fresh and self._cache and now - self._cache[0] < SCAN_TTL:
            return self._cache[1]
        found: dict[str, Located] = {}
        for root in self.roots:
            for name, path in _walk(root):
                if name in found:
                    self._warn_once(
                        name, f"adapter {name!r} exists in two --adapter-dir roots; serving the first"
                    )
                    continue
                found[name] = Located(name, path, root)
        self._cache = (now, found)
        return found

    def find(self, name: str) -> Located:
        """The adapter served as `name`, checked now on disk (not from the cached listing)."""
        check_name(name)
        for root in self.roots:
            candidate = root / name
            if not os.path.lexists(candidate):
                continue
            real = Path(os.path.realpath(candidate))
            if not _inside(real, root):
                raise AdapterPathError(f"adapter `{name}` is a symlink to a folder outside its --adapter-dir")
            if real.is_dir() and (real / ADAPTER_CONFIG).exists():
                check_folder(real, root, name)
                return Located(name, real, root)
        raise AdapterMissing(
            f"no adapter `{name}` in the adapter directories; it may have been deleted, or llm-train "
            "has not finished writing it"
        )

    # ---------------------------------------------------------------- runtime loading

    def contain(self, lora_path: str) -> Located:
        """Check a client-given `lora_path`: it must resolve (after symlinks and `..`) to a complete
        adapter folder inside a root. Relative paths are taken from the server's working directory."""
        if not lora_path or "\x00" in lora_path:
            raise AdapterInvalid("lora_path is empty or contains a NUL byte")
        if not self.roots:
            raise AdapterPathError("runtime loading needs --adapter-dir: no adapter directory is configured")
        real = Path(os.path.realpath(Path(lora_path).expanduser()))
        root = next((r for r in self.roots if _inside(real, r)), None)
        if root is None:
            raise AdapterPathError(
                f"lora_path `{lora_path}` resolves outside every adapter directory of this server; only "
                "adapters below an --adapter-dir can be loaded at runtime (copy or train it there)"
            )
        rel = real.relative_to(root).as_posix()
        if real == root:
            raise AdapterInvalid(
                f"lora_path `{lora_path}` is an adapter directory root, not an adapter folder"
            )
        if any(staging(p) for p in rel.split("/")):
            raise AdapterConflict(
                f"`{rel}` is inside a hidden or .partial staging folder (a run still writing it); "
                "load it once llm-train has renamed it into place"
            )
        if not real.exists():
            raise AdapterMissing(f"`{rel}` does not exist in the adapter directory")
        if not real.is_dir():
            raise AdapterInvalid(
                f"`{rel}` is a file, not an adapter folder (give the folder holding {ADAPTER_CONFIG})"
            )
        check_folder(real, root, rel)
        return Located(rel, real, root)

    def relative(self, path: Path) -> str:
        """`path` relative to the root holding it, for messages (never the server's absolute paths)."""
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if _inside(real, root):
                return real.relative_to(root).as_posix()
        return path.name

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def check_folder(real: Path, root: Path, rel: str) -> None:
    """A folder inside `root` is a complete, safetensors adapter whose files all stay inside `root`."""
    for f in read_files(real):
        if not _inside(Path(os.path.realpath(f)), root):
            name = f.relative_to(real).as_posix()
            raise AdapterPathError(f"`{rel}/{name}` is a symlink to a file outside its adapter directory")
    if not (real / ADAPTER_CONFIG).is_file():
        raise AdapterInvalid(f"`{rel}` has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    if not is_adapter_folder(real):
        pickled = next((p for p in PICKLED_ADAPTER_WEIGHTS if (real / p).exists()), None)
        if pickled:
            raise AdapterInvalid(
                f"`{rel}/{pickled}` is a pickled checkpoint, refused because loading it can run code; "
                "re-save it with safetensors (PeftModel.save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterInvalid(f"`{rel}` has no {ADAPTER_WEIGHTS}")


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _walk(root: Path, rel: str = "", depth: int = 0) -> Iterable[tuple[str, Path]]:
    """(name, resolved folder) of complete adapters below `root`, sorted, not descending into them."""
    base = root / rel if rel else root
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if staging(entry.name) or not COMPONENT_RE.match(entry.name):
            continue
        name = f"{rel}/{entry.name}" if rel else entry.name
        try:
            if not entry.is_dir():  # follows symlinks: a link to a folder counts, checked below
                continue
        except OSError:
            continue
        real = Path(os.path.realpath(entry.path))
        if not _inside(real, root):
            continue  # a symlink out of the root is never listed (and refused by `find`)
        if is_adapter_folder(real):
            try:
                check_folder(real, root, name)
            except AdapterError:
                continue  # e.g. its weights are a symlink out of the root: `find` says why
            yield name, real
        elif depth + 1 < MAX_DEPTH and not entry.is_symlink():
            yield from _walk(root, name, depth + 1)
