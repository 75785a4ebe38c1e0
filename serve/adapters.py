"""LoRA adapter specs and the preflight that runs at start-up, before any weights load.

`--adapter [NAME=]PATH` becomes an `AdapterSpec` after these checks: the directory holds
`adapter_config.json` and `adapter_model.safetensors` (pickled `.bin` weights are refused), the
adapter was trained on the served base (or `--allow-base-mismatch`), and its chat template, if it
ships one, is picked up so the adapter is served with the template it was trained with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


class AdapterError(ValueError):
    """An adapter cannot be served; the message says which file and what to do."""


@dataclass
class AdapterSpec:
    name: str
    path: Path
    base_model: str  # adapter_config.json's base_model_name_or_path
    rank: int
    alpha: float
    target_modules: list[str]
    chat_template: str | None = None  # from the adapter dir, when it ships a tokenizer config
    manifest: dict | None = None  # run_manifest.json written by llm-train, when present
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
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise AdapterError(
            f"adapter {name!r}: {cfg_path} is missing (found: {present}); point --adapter at the "
            "directory llm-train or PEFT's save_pretrained wrote"
        )
    if not (path / "adapter_model.safetensors").is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"adapter {name!r}: {path / 'adapter_model.bin'} is a pickled checkpoint, which is "
                "refused because loading it can run code; re-save it with safetensors "
                "(PeftModel.save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterError(f"adapter {name!r}: {path / 'adapter_model.safetensors'} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {cfg_path} is not valid JSON ({exc})") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    targets = cfg.get("target_modules") or []
    manifest = None
    if (path / "run_manifest.json").is_file():
        try:
            manifest = json.loads((path / "run_manifest.json").read_text())
        except json.JSONDecodeError:
            manifest = None
    return AdapterSpec(
        name=name,
        path=path.resolve(),
        base_model=str(cfg.get("base_model_name_or_path") or ""),
        rank=int(cfg.get("r", 8)),
        alpha=float(cfg.get("lora_alpha", cfg.get("r", 8))),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        chat_template=_adapter_chat_template(path),
        manifest=manifest,
    )


def _adapter_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            tpl = json.loads(tok_cfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            return None
        if isinstance(tpl, str):
            return tpl
    return None


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
    manifest_base = (spec.manifest or {}).get("base_model", {})
    candidates = {base, Path(base).name}
    if isinstance(manifest_base, dict):
        candidates |= {str(manifest_base.get("name", "")), str(manifest_base.get("path", ""))}
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
