"""On-disk cache of the matmul tuning that `serve.engine.gemm` measures at load.

Timing every weight shape at every row count costs seconds per start (~10 s for the default model on
2 cores), and a machine's answer does not change between starts. `gemm`'s tuning functions, called
with `cache=True`, store what they measured in `$LLM_SERVE_HOME/tune/<kind>-<hash>.json` and reuse
it while everything the measurement depends on is unchanged: the key holds the CPU (model name and
its matmul flags), torch's version and thread count, `OMP_WAIT_POLICY`, the weight shapes and dtypes,
the tuning constants and `FORMAT_VERSION`. A different key is another file (a miss, never a wrong
table); an unreadable, corrupt or mismatching file is a miss, logged at debug level.

`LLM_SERVE_RETUNE=1` measures again and overwrites the file (after a BIOS, VM or load change the key
cannot see). Files are written atomically (`serve.atomic`): a killed start leaves the old file or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from serve.atomic import write_json_atomic

logger = logging.getLogger(__name__)

# Bump when what `gemm` measures, or how, changes: files of older versions are then never read.
FORMAT_VERSION = 1
RETUNE_ENV = "LLM_SERVE_RETUNE"
# CPU flags that change which matmul kernels MKL/oneDNN pick (the rest, e.g. hypervisor bits, do not).
_MATMUL_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def cpu_info() -> tuple[str, set[str]]:
    """The first processor's `model name` and `flags` in /proc/cpuinfo (empty where there is none)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def machine_key() -> dict[str, Any]:
    """What, besides the weights and constants, a tuning measurement depends on."""
    model, flags = cpu_info()
    return {
        "cpu": model or f"{platform.machine()} {platform.processor()}",
        "cpu_flags": sorted(f for f in flags if f.startswith(_MATMUL_FLAG_PREFIXES)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


def retune_requested() -> bool:
    return os.environ.get(RETUNE_ENV, "") not in ("", "0")


def cache_path(kind: str, full_key: dict[str, Any]) -> Path:
    from serve.models.registry import llm_serve_home

    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:16]
    return llm_serve_home() / "tune" / f"{kind.replace(' ', '-')}-{digest}.json"


def load(kind: str, key: dict[str, Any], check: Callable[[Any], None]) -> Any | None:
    """The value stored for `kind` under `key` on this machine, or None (a miss, or a retune asked).

    `check(value)` raises (ValueError, TypeError, KeyError, IndexError) on a stored value that cannot
    be applied; such a file is a miss.
    """
    if retune_requested():
        logger.info("%s: %s is set, measuring again", kind, RETUNE_ENV)
        return None
    full_key = _full_key(kind, key)
    path = cache_path(kind, full_key)
    value = _read(path, full_key, check)
    if value is not None:
        logger.info("%s: loaded from %s (%s=1 measures again)", kind, path, RETUNE_ENV)
    return value


def save(kind: str, key: dict[str, Any], value: Any, seconds: float) -> None:
    """Store `value` (JSON-able), measured in `seconds`, for `kind` under `key`; a failed write only logs."""
    full_key = _full_key(kind, key)
    path = cache_path(kind, full_key)
    try:
        write_json_atomic(path, {"format": FORMAT_VERSION, "key": full_key, "value": value})
        logger.info("%s: measured in %.1f s, saved to %s", kind, seconds, path)
    except OSError as exc:
        logger.warning("%s: measured in %.1f s, not saved (%s)", kind, seconds, exc)


def cached(kind: str, key: dict[str, Any], measure: Callable[[], Any], check: Callable[[Any], None]) -> Any:
    """`measure()`'s JSON-able result, loaded when this machine stored one under `key`, else measured
    and saved."""
    value = load(kind, key, check)
    if value is None:
        t0 = time.perf_counter()
        value = measure()
        save(kind, key, value, time.perf_counter() - t0)
    return value


def _full_key(kind: str, key: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": kind, "machine": machine_key(), **key}


def _read(path: Path, full_key: dict[str, Any], check: Callable[[Any], None]) -> Any:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        logger.debug("tuning cache: no %s", path)
        return None
    except (OSError, ValueError) as exc:
        logger.debug("tuning cache: %s unreadable (%s), measuring", path, exc)
        return None
    if not isinstance(stored, dict) or stored.get("key") != full_key or "value" not in stored:
        logger.debug("tuning cache: %s is for another key or malformed, measuring", path)
        return None
    try:
        check(stored["value"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        logger.debug("tuning cache: %s holds an unusable value (%s), measuring", path, exc)
        return None
    return stored["value"]
