"""Adapters that come and go while the server runs: folders below `--adapter-dir` and runtime loads.

`ServedModels` asks this registry for every model id it does not know from start-up:
- a folder below an adapter directory is served under its relative path; the first request for it
  runs the start-up checks (`preflight.AdapterChecker`, headers only) and the engine's own, then the
  engine reads it (`Engine.add_adapter`). A folder rewritten in place (a new inode, size or mtime of
  its files: `llm-train --overwrite` renaming a new run into place) becomes a new version on its next
  request; a deleted one is dropped from the list and answers 404.
- `load` / `unload` are POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's shapes).
  `load_inplace` registers a new version under a new engine key and retires the old one: requests
  already running finish on the old weights, new ones get the new weights, none sees a mix.

A refused adapter raises the typed error the API maps to a status (`AdapterInvalid` 400,
`AdapterPathError` 403, `AdapterMissing` 404, `AdapterConflict` 409), with paths relative to the
adapter directory, never the server's absolute paths; each refusal is logged once per version.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve.adapter_dirs import AdapterRoots, Located, fingerprint
from serve.adapters import NAME_RE, AdapterError, AdapterInvalid, AdapterMissing, AdapterSpec
from serve.artifacts.model_folder import is_adapter_folder

logger = logging.getLogger(__name__)

MAX_REMEMBERED_FAILURES = 1024


@dataclass
class Entry:
    model: object  # served.ServedModel; `model.adapter` is the engine key of this version
    origin: str  # "start-up", "runtime" or "directory"
    path: Path
    fingerprint: tuple | None = None  # directory adapters: notices a rewrite in place


class AdapterRegistry:
    def __init__(
        self,
        engine,
        checker,
        roots: AdapterRoots,
        make_model: Callable[[str, AdapterSpec, str], object],
        list_model: Callable[[str, Path], object],
        reserved: tuple[str, ...],
    ):
        """`make_model(name, spec, key)` builds the ServedModel of an adapter version; `list_model`
        the listing-only entry of a folder not requested yet; `reserved` are the base's id, then its
        aliases."""
        self.engine, self.checker, self.roots = engine, checker, roots
        self.make_model, self.list_model = make_model, list_model
        self.reserved = reserved
        self.pinned: dict[str, Entry] = {}  # start-up and runtime-loaded adapters
        self.found: dict[str, Entry] = {}  # directory adapters requested at least once
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[tuple, AdapterError] = {}
        self._versions = itertools.count(1)

    def add_startup(self, name: str, spec: AdapterSpec) -> None:
        """A `--adapter` the engine was built with (its engine key is its name)."""
        self.pinned[name] = Entry(self.make_model(name, spec, name), "start-up", spec.path)

    # ---------------------------------------------------------------- lookups

    def current(self, name: str):
        entry = self.pinned.get(name)
        return entry.model if entry else None

    def listed(self) -> list:
        """Pinned adapters, then every adapter in the directories (requested or not), by name."""
        out = [e.model for e in self.pinned.values()]
        scanned = self.roots.scan() if self.roots else {}
        # The walk is cached for a second; a stat per adapter keeps a deletion out of the list at once.
        found = {n: loc.path for n, loc in scanned.items() if is_adapter_folder(loc.path)}
        for name, entry in list(self.found.items()):
            if name in found:
                continue
            if is_adapter_folder(entry.path):
                found[name] = entry.path  # loaded since the listing was cached
            else:
                self._drop_found(name, "its folder is gone")
        for name, path in found.items():
            if name in self.pinned or name in self.reserved:
                continue
            entry = self.found.get(name)
            out.append(entry.model if entry else self.list_model(name, path))
        return out

    async def resolve(self, name: str):
        """The served model for an adapter of the directories, checked and loaded on first request."""
        if not self.roots:
            raise AdapterMissing(f"The model `{name}` does not exist")
        async with self._lock(name):
            try:
                located = self.roots.find(name)
            except AdapterMissing:
                self._drop_found(name, "its folder is gone")
                raise
            fp = fingerprint(located.path)
            entry = self.found.get(name)
            if entry and entry.fingerprint == fp and entry.path == located.path:
                return entry.model
            model = await self._add(name, located, fp)
            self.found[name] = Entry(model, "directory", located.path, fp)
            if entry is not None:
                logger.info("adapter %r changed on disk: serving the new version", name)
                self.engine.remove_adapter(entry.model.adapter, successor=model.adapter)
            return model

    # ---------------------------------------------------------------- runtime load / unload

    async def load(self, name: str, lora_path: str, inplace: bool) -> str:
        if not name or not NAME_RE.match(name.replace("/", "_")):
            raise AdapterInvalid(
                f"lora_name {name!r} is not valid: use letters, digits, '.', '_', '-', ':' or '/'"
            )
        if name in self.reserved:
            raise AdapterInvalid(f"The lora adapter '{name}' conflicts with a served base model.")
        async with self._lock(name):
            old = self.pinned.get(name) or self.found.get(name)
            if old is not None and not inplace:
                raise AdapterInvalid(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                    "in place, set 'load_inplace' to True."
                )
            located = self.roots.contain(lora_path)
            model = await self._add(name, located, fingerprint(located.path))
            self.pinned[name] = Entry(model, "runtime", located.path)
            if old is not None:
                self.found.pop(name, None)
                self.engine.remove_adapter(old.model.adapter, successor=model.adapter)
            logger.info("loaded adapter %r from %s (engine key %s)", name, located.name, model.adapter)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str) -> str:
        async with self._lock(name):
            entry = self.pinned.pop(name, None) or self.found.pop(name, None)
            if entry is None:
                raise AdapterMissing(f"The lora adapter '{name}' cannot be found.")
            self.engine.remove_adapter(entry.model.adapter)
            logger.info("unloaded adapter %r (running requests finish first)", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ---------------------------------------------------------------- internals

    async def _add(self, name: str, located: Located, fp: tuple):
        """Check and load one adapter version; the same refusal is logged once and remembered."""
        remembered = self._failures.get((name, located.path, fp))
        if remembered is not None:
            raise remembered
        key = f"{name}@{next(self._versions)}"
        try:
            spec = await asyncio.to_thread(self.checker.check, name, located.path)
            self.engine.check_adapter(spec)
            await self.engine.add_adapter(key, spec)
        except Exception as exc:
            error = self._client_error(exc, located)
            if len(self._failures) >= MAX_REMEMBERED_FAILURES:
                self._failures.clear()
            self._failures[(name, located.path, fp)] = error
            logger.warning("adapter %r (%s) refused: %s", name, located.name, error)
            raise error from None
        return self.make_model(name, spec, key)

    def _client_error(self, exc: Exception, located: Located) -> AdapterError:
        """The same kind of error with the server's absolute paths made relative to the root."""
        message = str(exc)
        for prefix in (str(located.root) + "/", str(located.root)):
            message = message.replace(prefix, "")
        base = self.checker.model_path
        for path in sorted({str(base), str(base.resolve())}, key=len, reverse=True):
            message = message.replace(path, self.reserved[0])
        if f"`{located.name}" not in message:
            message = f"`{located.name}`: {message}"
        if isinstance(exc, AdapterError):
            return type(exc)(message)
        if isinstance(exc, ValueError):  # the engine's reader: DoRA, modules_to_save, bad tensors
            return AdapterInvalid(message)
        return AdapterInvalid(f"adapter `{located.name}` could not be read: {type(exc).__name__}: {message}")

    def _drop_found(self, name: str, why: str) -> None:
        entry = self.found.pop(name, None)
        if entry is not None:
            logger.info("adapter %r no longer served: %s", name, why)
            self.engine.remove_adapter(entry.model.adapter)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())
