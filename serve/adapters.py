"""LoRA adapter specs and the preflight that runs at start-up, before any weights load.

`--adapter [NAME=]PATH` becomes an `AdapterSpec` after these checks: the directory holds
`adapter_config.json` and `adapter_model.safetensors` (pickled `.bin` weights are refused), the
adapter was trained on the served base (or `--allow-base-mismatch`), and its chat template, if it
ships one, is picked up so the adapter is served with the template it was trained with. What an
adapter folder holds and who reads each file: serve.artifacts.model_folder (which reads it here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from serve.artifacts.model_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLED_ADAPTER_WEIGHTS,
    FolderError,
    FolderFacts,
    read_adapter_config,
    read_folder,
)
from serve.artifacts.run_manifest import ManifestError, RunManifest
from serve.cli_runner import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


class AdapterError(UserError, ValueError):
    """An adapter cannot be served; the message says which file and what to do."""


# Kinds of failure for adapters added while serving, each answered with its own HTTP status.
class AdapterPathError(AdapterError):
    """A path escapes every adapter directory (HTTP 403)."""


class AdapterMissing(AdapterError):
    """No adapter by that name or path, or it was deleted or unloaded (HTTP 404)."""


class AdapterInvalid(AdapterError):
    """The folder exists but cannot be served as it is (HTTP 400)."""


class AdapterConflict(AdapterError):
    """The adapter conflicts with what is served, e.g. it was trained on another base (HTTP 409)."""


@dataclass
class AdapterSpec:
    name: str
    path: Path
    base_model: str  # adapter_config.json's base_model_name_or_path
    rank: int
    alpha: float
    target_modules: list[str]
    chat_template: str | None = None  # from the adapter dir, when it ships a tokenizer config
    manifest: RunManifest | None = None  # run_manifest.json written by llm-train, when present
    facts: FolderFacts | None = field(default=None, repr=False)  # everything else the folder says
    extra: dict = field(default_factory=dict)


def parse_adapter_arg(arg: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (the name is then the directory's name)."""
    name, sep, path = arg.partition("=")
    if not sep:
        path, name = arg, Path(arg.rstrip("/")).name
    if not NAME_RE.match(name):
        raise AdapterError(
            f"adapter name {name!r} is not valid: use letters, digits, '.', '_', '-' or ':' "
            "(give it as --adapter NAME=PATH)"
        )
    return name, Path(path).expanduser()


def load_adapter_spec(name: str, path: Path) -> AdapterSpec:
    """Read and check an adapter directory; raises AdapterError naming the problem."""
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory (train one with `llm-train`)")
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise AdapterError(
            f"adapter {name!r}: {cfg_path} is missing (found: {present}); point --adapter at the "
            "directory llm-train or PEFT's save_pretrained wrote"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = next((path / p for p in PICKLED_ADAPTER_WEIGHTS if (path / p).is_file()), None)
        if pickled is not None:
            raise AdapterError(
                f"adapter {name!r}: {pickled} is a pickled checkpoint, which is "
                "refused because loading it can run code; re-save it with safetensors "
                "(PeftModel.save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterError(f"adapter {name!r}: {path / ADAPTER_WEIGHTS} is missing")
    try:
        cfg = read_adapter_config(path)
        facts = read_folder(path)
    except (FolderError, ManifestError) as exc:
        raise AdapterError(f"adapter {name!r}: {exc}") from exc
    if cfg.peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {cfg.peft_type!r} is not LoRA")
    return AdapterSpec(
        name=name,
        path=path.resolve(),
        base_model=cfg.base_model,
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=cfg.target_modules,
        chat_template=facts.chat_template,
        manifest=facts.manifest,
        facts=facts,
    )


def base_aliases(model_name: str, model_path: Path, served_id: str) -> set[str]:
    """Names under which an adapter may record the served base."""
    names = {model_name, str(model_path), str(model_path.resolve()), model_path.name, served_id}
    if model_name == "default":
        names |= {"HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"}
    return {n.rstrip("/") for n in names if n}


def check_base_match(spec: AdapterSpec, aliases: set[str], allow_mismatch: bool) -> None:
    base = spec.base_model.rstrip("/")
    if not base or allow_mismatch:
        return
    candidates = {base, Path(base).name}
    if spec.manifest is not None:
        candidates |= {spec.manifest.base_model.name, spec.manifest.base_model.path}
    if candidates & aliases:
        return
    raise AdapterError(
        f"adapter {spec.name!r} was trained on {spec.base_model!r} but the served base is "
        f"{sorted(aliases)[0]!r}; serve it with --model {spec.base_model} or pass "
        "--allow-base-mismatch if you know they are the same weights"
    )


def check_adapter_shapes(spec: AdapterSpec, module_shapes: dict[str, tuple[int, int]]) -> None:
    """Compare LoRA A/B shapes with the base's Linear shapes (reads only safetensors headers)."""
    from safetensors import safe_open

    with safe_open(str(spec.path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.\w+)?\.weight$", key)
            if not m:
                continue
            module, which = m.group(1), m.group(2)
            if module not in module_shapes:
                raise AdapterError(
                    f"adapter {spec.name!r}: weight {key} targets {module!r}, which the base model "
                    "does not have; it was trained on a different architecture"
                )
            out_f, in_f = module_shapes[module]
            shape = tuple(f.get_slice(key).get_shape())
            want = in_f if which == "A" else out_f
            got = shape[1] if which == "A" else shape[0]
            if got != want:
                raise AdapterError(
                    f"adapter {spec.name!r}: {key} has shape {list(shape)} but {module} of the "
                    f"served base has {'in' if which == 'A' else 'out'}_features={want}; the adapter "
                    "was trained on a different base model"
                )
