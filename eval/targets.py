"""What gets scored: the base model and each adapter, loaded locally or served by an
OpenAI-compatible server (llm-serve, vLLM).

Local: `--model default|PATH` plus `--adapter [NAME=]PATH` (a PEFT directory; it must have been
trained on that base, checked with serve.adapters before any weights load). Server (`--base-url`):
model ids listed by `GET /v1/models`; the base is `--model` or the entry without a `parent`,
adapters are `--adapter NAME` (or `NAME=PATH`, the path only read for its training manifest).
Each target has a fingerprint that keys the generation cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from serve.artifacts.provenance import file_sha256
from serve.artifacts.run_manifest import RunManifest, read_manifest
from serve.cli_runner import UserError


class TargetError(UserError, ValueError):
    """A target cannot be scored; the message says which and what to do."""


@dataclass
class Target:
    """One model to score."""

    name: str  # "base" or the adapter's name
    kind: Literal["local", "server"]
    is_base: bool
    fingerprint: str  # identifies the weights (cache key part)
    model_path: Path | None = None  # local base checkpoint
    adapter_path: Path | None = None  # local PEFT directory
    model_id: str | None = None  # id on the server
    manifest: RunManifest | None = field(default=None, repr=False)  # adapter's run_manifest.json

    def describe(self) -> str:
        if self.kind == "server":
            return f"{self.model_id} (server)"
        return str(self.adapter_path or self.model_path)


def local_targets(model: str, adapters: list[str], allow_base_mismatch: bool = False) -> list[Target]:
    """The base plus each adapter, checked against the base before anything loads."""
    from serve.adapters import base_aliases, check_base_match, load_adapter_spec, parse_adapter_arg
    from serve.models import resolve_model

    resolved = resolve_model(model)
    aliases = base_aliases(resolved.name, resolved.path, resolved.served_id)
    targets = [
        Target("base", "local", True, f"local:{_dir_fingerprint(resolved.path)}", model_path=resolved.path)
    ]
    for arg in adapters:
        name, path = parse_adapter_arg(arg)
        if name == "base" or any(t.name == name for t in targets):
            raise TargetError(f"adapter name {name!r} is used twice (or is 'base'); give --adapter NAME=PATH")
        spec = load_adapter_spec(name, path)
        check_base_match(spec, aliases, allow_base_mismatch)
        fingerprint = f"local:{_dir_fingerprint(resolved.path)}+{file_sha256(spec.path / 'adapter_model.safetensors')[:16]}"
        targets.append(
            Target(name, "local", False, fingerprint, resolved.path, spec.path, manifest=spec.manifest)
        )
    return targets


def server_targets(
    base_url: str, api_key: str | None, model: str | None, adapters: list[str]
) -> list[Target]:
    """Targets on a running server; raises TargetError if it is unreachable or lacks a model."""
    listed = list_server_models(base_url, api_key)
    ids = [m.get("id") for m in listed]
    roots = [m.get("id") for m in listed if not m.get("parent")]
    base_id = model if model and model != "default" else (roots[0] if roots else None)
    if base_id is None or base_id not in ids:
        raise TargetError(
            f"model {base_id!r} is not served at {base_url}; it serves: {', '.join(map(str, ids))}"
        )
    targets = [Target("base", "server", True, f"server:{base_url}:{base_id}", model_id=base_id)]
    for arg in adapters:
        name, _, path = arg.partition("=")
        if name not in ids:
            raise TargetError(
                f"adapter {name!r} is not served at {base_url}; it serves: {', '.join(map(str, ids))} "
                f"(start the server with --adapter {name}=PATH)"
            )
        # a local copy of a served adapter is only read for its training manifest and loss log
        local = Path(path) if path else None
        manifest = read_manifest(local) if local else None
        fingerprint = f"server:{base_url}:{name}"
        targets.append(
            Target(name, "server", False, fingerprint, None, local, model_id=name, manifest=manifest)
        )
    return targets


def check_api_extras() -> None:
    """lm-eval's API models (local-completions) need lm-eval[api]'s extras; say so before anything runs."""
    import importlib.util

    missing = [m for m in ("tenacity", "aiohttp") if importlib.util.find_spec(m) is None]
    if missing:
        raise TargetError(
            f"scoring lm-eval tasks on a server needs lm-eval's API extras: install {', '.join(missing)} "
            "(pip install 'lm-eval[api]')"
        )


def list_server_models(base_url: str, api_key: str | None, timeout: float = 10.0) -> list[dict]:
    """`GET /v1/models`, or TargetError saying the server cannot be reached and what to check."""
    import requests

    url = f"{base_url.rstrip('/')}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = requests.get(url, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise TargetError(
            f"cannot reach the server at {base_url} ({type(exc).__name__}); start one with "
            "`llm-serve --adapter NAME=PATH` or check --base-url"
        ) from exc
    if resp.status_code == 401:
        raise TargetError(f"{url} refused the API key (401); pass the server's key with --api-key")
    if resp.status_code != 200:
        raise TargetError(f"{url} answered {resp.status_code}; is --base-url an OpenAI-compatible server?")
    try:
        return list(resp.json()["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TargetError(
            f"{url} did not answer a model list ({exc}); is it an OpenAI-compatible server?"
        ) from exc


def normalize_base_url(url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all mean the server root `http://h:p`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _dir_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint: its path, config and weight files' sizes and mtimes."""
    parts = [str(path.resolve())]
    for f in sorted(path.glob("*")):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
