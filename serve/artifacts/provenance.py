"""What a file or run came from: sha256 of files, checkpoints and texts, and installed package versions.

Checksums of big files are cached in `$LLM_SERVE_HOME/sha256-cache.json` under the file's path, size
and mtime, so hashing a 538 MB base model for every manifest and eval fingerprint costs one read.

    file_sha256("saves/demo/adapter_model.safetensors")   # hex digest
    model_sha256(Path("~/.cache/llm-serve/models/..."))    # the weights of a checkpoint folder
    package_versions(("torch", "peft"))                    # {"torch": "2.x", "peft": "0.18.1"}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from serve.atomic import write_json_atomic

CACHE_MIN_BYTES = 1 << 20  # smaller files are re-hashed: cheaper than a cache entry


def _cache_path() -> Path:
    from serve.models import llm_serve_home

    return llm_serve_home() / "sha256-cache.json"


def file_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 of a file; for big files the digest is cached under the file's path, size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _cache_path()
    cache: dict[str, str] = {}
    if use_cache and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}
        if key in cache:
            return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if use_cache and st.st_size > CACHE_MIN_BYTES:
        cache[key] = value
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_file, cache)
        except OSError:
            pass  # a read-only cache dir only costs a re-hash next time
    return value


def model_sha256(model_dir: Path) -> str:
    """sha256 of `model.safetensors`, or of the sorted per-shard digests for sharded checkpoints."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return file_sha256(single)
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        return ""
    return hashlib.sha256("".join(file_sha256(s) for s in shards).encode()).hexdigest()


def text_sha256(text: str | None) -> str | None:
    """sha256 of a text (a chat template, a prompt), None for None or empty."""
    return hashlib.sha256(text.encode()).hexdigest() if text else None


def package_versions(names: Iterable[str], *, missing: bool = False) -> dict[str, str | None]:
    """Installed versions of `names`; a package that is not installed is left out (or None if `missing`)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if missing:
                versions[name] = None
    return versions
