"""Checks that run before any weights load: the model resolves, every adapter is servable on it.

Raised errors name the file and say what to do; `cli.main` prints them and exits with status 2.
`AdapterChecker` runs the same adapter checks while serving, for adapters found in an
`--adapter-dir` or loaded at runtime, raising the typed errors the API answers with (400/409).
"""

from __future__ import annotations

from pathlib import Path

from serve.adapter_dirs import AdapterRoots
from serve.adapters import (
    AdapterConflict,
    AdapterError,
    AdapterInvalid,
    AdapterSpec,
    base_aliases,
    check_adapter_shapes,
    check_base_match,
    load_adapter_spec,
    parse_adapter_arg,
)
from serve.artifacts.model_folder import read_adapter_config
from serve.config import ServeConfig
from serve.models import ResolvedModel, resolve_model


def base_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """`{module: (out_features, in_features)}` for every 2-D weight, from safetensors headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight"):
                    shape = f.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    return shapes


class AdapterChecker:
    """The adapter checks of start-up, for one served base: files, base match, shapes (headers only)."""

    def __init__(self, config: ServeConfig, model: ResolvedModel):
        self.aliases = base_aliases(config.model, model.path, model.served_id)
        self.allow_mismatch = config.allow_base_mismatch
        self.model_path = model.path
        self._shapes: dict[str, tuple[int, int]] | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        if self._shapes is None:
            self._shapes = base_linear_shapes(self.model_path)
        return self._shapes

    def check(self, name: str, path: Path) -> AdapterSpec:
        """A checked spec; AdapterInvalid when the folder cannot be served, AdapterConflict when it
        was made for another base model."""
        try:
            spec = load_adapter_spec(name, path)
        except AdapterError as exc:
            raise AdapterInvalid(str(exc)) from None
        try:
            check_base_match(spec, self.aliases, self.allow_mismatch)
            check_adapter_shapes(spec, self.shapes)
        except AdapterError as exc:
            raise AdapterConflict(str(exc)) from None
        except Exception as exc:  # an unreadable safetensors header
            raise AdapterInvalid(
                f"adapter {name!r}: adapter_model.safetensors cannot be read ({exc})"
            ) from None
        return spec


def adapter_dir_ranks(roots: AdapterRoots) -> list[int]:
    """LoRA ranks of the adapters present in the adapter directories now (adapter_config.json only)."""
    ranks = []
    for located in roots.scan(fresh=True).values():
        try:
            ranks.append(read_adapter_config(located.path).rank)
        except (OSError, ValueError, TypeError):  # FolderError is a ValueError
            continue  # refused, with its reason, when first requested
    return ranks


def preflight(config: ServeConfig) -> tuple[ResolvedModel, list[AdapterSpec]]:
    """Resolve the model and check every start-up adapter; also checks the adapter directories exist
    and, when --max-lora-rank is not given, sets it from the largest rank found (at least 8)."""
    model = resolve_model(config.model)
    base_id = config.served_model_name or model.served_id
    checker = AdapterChecker(config, model)
    roots = AdapterRoots(config.adapter_dirs)
    roots.check_exist()
    specs: list[AdapterSpec] = []
    seen: dict[str, Path] = {}
    for arg in config.adapters:
        name, path = parse_adapter_arg(arg)
        if name == base_id:
            raise AdapterError(
                f"adapter name {name!r} is the base model's id; give it another name (NAME=PATH)"
            )
        if name in seen:
            raise AdapterError(f"two adapters are named {name!r} ({seen[name]} and {path}); use NAME=PATH")
        seen[name] = path
        spec = load_adapter_spec(name, path)
        check_base_match(spec, checker.aliases, config.allow_base_mismatch)
        check_adapter_shapes(spec, checker.shapes)
        specs.append(spec)
    if config.max_lora_rank is None:
        config.max_lora_rank = max([8, *(s.rank for s in specs), *adapter_dir_ranks(roots)])
    return model, specs
