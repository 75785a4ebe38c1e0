"""Checks that run before any weights load: the model resolves, every adapter is servable on it.

Raised errors name the file and say what to do; `cli.main` prints them and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path

from serve.adapters import (
    AdapterError,
    AdapterSpec,
    base_aliases,
    check_adapter_shapes,
    check_base_match,
    load_adapter_spec,
    parse_adapter_arg,
)
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


def preflight(config: ServeConfig) -> tuple[ResolvedModel, list[AdapterSpec]]:
    model = resolve_model(config.model)
    base_id = config.served_model_name or model.served_id
    aliases = base_aliases(config.model, model.path, model.served_id)
    specs: list[AdapterSpec] = []
    seen: dict[str, Path] = {}
    shapes = base_linear_shapes(model.path) if config.adapters else {}
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
        check_base_match(spec, aliases, config.allow_base_mismatch)
        check_adapter_shapes(spec, shapes)
        specs.append(spec)
    return model, specs
