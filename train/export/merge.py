"""Merge LoRA adapters into full float32 weights with PEFT, with the template the adapters were trained with.

Used by `pipeline.run_export`: `resolve_base` finds the base the adapters record (run manifest, then
adapter_config.json) and refuses a mismatch naming both; `load_with_adapters` builds base+adapters
(all active, the reference the merge is verified against); `merge` folds them into the weights;
`save_merged` writes safetensors shards, the tokenizer, the chat template and a generation_config.json
whose EOS ids include the template's end-of-turn token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
from serve.models import ModelNotFoundError, ResolvedModel, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_BASE_NAMES = {"HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"}


class ExportError(ValueError):
    """The export cannot run; the message names the file or parameter and what to do."""


@dataclass
class MergePlan:
    """Everything decided before weights load: adapters, base, tokenizer source, template, EOS."""

    specs: list[AdapterSpec]
    base: ResolvedModel
    tokenizer_dir: Path  # the adapter's tokenizer when it ships one, else the base's
    chat_template: str | None
    system_prompt: str | None  # the run's system prompt, for the Modelfile


def load_specs(adapter_args: list[str]) -> list[AdapterSpec]:
    specs = [load_adapter_spec(*parse_adapter_arg(arg)) for arg in adapter_args]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExportError(f"adapter name(s) {dupes} given twice; name them with --adapter NAME=PATH")
    return specs


def recorded_base(spec: AdapterSpec) -> str:
    """The base an adapter was trained on: run manifest path (if it exists), manifest name, adapter_config."""
    manifest_base = (spec.manifest or {}).get("base_model")
    if isinstance(manifest_base, dict):
        path = manifest_base.get("path")
        if path and Path(path).exists():
            return str(path)
        if manifest_base.get("name"):
            return str(manifest_base["name"])
    elif isinstance(manifest_base, str) and manifest_base:
        return manifest_base
    if spec.base_model:
        return spec.base_model
    raise ExportError(
        f"adapter {spec.name!r}: neither {spec.path / 'run_manifest.json'} nor adapter_config.json "
        "records a base model; pass it with --base MODEL"
    )


def resolve_base(specs: list[AdapterSpec], base: str | None = None) -> ResolvedModel:
    """Resolve the base model and check every adapter was trained on it (raises naming both)."""
    name = base or recorded_base(specs[0])
    if name.rstrip("/") in DEFAULT_BASE_NAMES:
        name = "default"
    try:
        resolved = resolve_model(name)
    except ModelNotFoundError as exc:
        raise ExportError(
            f"adapter {specs[0].name!r} records base {name!r}, which is not available locally ({exc}); "
            "pass the base with --base MODEL"
        ) from exc
    aliases = base_aliases(name, resolved.path, resolved.served_id)
    for spec in specs:
        try:
            check_base_match(spec, aliases, allow_mismatch=False)
        except AdapterError as exc:
            raise ExportError(
                f"adapter {spec.name!r} was trained on {recorded_base(spec)!r} but the export base is "
                f"{name!r} ({resolved.path}); export it on its own base or pass --base"
            ) from exc
        _check_base_checksum(spec, resolved)
    return resolved


def _check_base_checksum(spec: AdapterSpec, base: ResolvedModel) -> None:
    """llm-train records the sha256 of the base weights; a base with other weights under the same name fails."""
    recorded = ((spec.manifest or {}).get("base_model") or {}).get("sha256")
    if not recorded or not isinstance(recorded, str):
        return
    from train.manifest import model_sha256

    actual = model_sha256(base.path)
    if actual and actual != recorded:
        raise ExportError(
            f"adapter {spec.name!r} was trained on base weights with sha256 {recorded[:12]}… but "
            f"{base.path} has {actual[:12]}…; export it on the base it was trained on (--base)"
        )


def plan_full(model: str) -> MergePlan:
    """A full checkpoint exported as it is (no adapters): its own tokenizer, template and system prompt."""
    try:
        resolved = resolve_model(model)
    except ModelNotFoundError as exc:
        raise ExportError(f"--model {model}: {exc}") from exc
    manifest = {}
    if (resolved.path / "run_manifest.json").is_file():
        manifest = json.loads((resolved.path / "run_manifest.json").read_text())
    system = ((manifest.get("template") or {}) if isinstance(manifest.get("template"), dict) else {}).get(
        "default_system"
    )
    return MergePlan([], resolved, resolved.path, _dir_template(resolved.path), system or None)


def plan_merge(adapter_args: list[str], base: str | None = None) -> MergePlan:
    """Read adapters, pick base, tokenizer, chat template and system prompt; loads no weights."""
    specs = load_specs(adapter_args)
    resolved = resolve_base(specs, base)
    templates = {s.name: _manifest_template(s) or s.chat_template for s in specs}
    distinct = {t for t in templates.values() if t}
    if len(distinct) > 1:
        names = [n for n, t in templates.items() if t]
        raise ExportError(
            f"adapters {names} were trained with different chat templates; merge adapters trained "
            "with the same template"
        )
    tokenizer_dir = next(
        (s.path for s in reversed(specs) if all((s.path / f).is_file() for f in TOKENIZER_FILES)),
        resolved.path,
    )
    template = distinct.pop() if distinct else _dir_template(tokenizer_dir) or _dir_template(resolved.path)
    system = next((_manifest_system(s) for s in reversed(specs) if _manifest_system(s)), None)
    return MergePlan(specs, resolved, tokenizer_dir, template, system)


def _manifest_template(spec: AdapterSpec) -> str | None:
    manifest = spec.manifest or {}
    for value in (manifest.get("chat_template"), (manifest.get("tokenizer") or {}).get("chat_template")):
        if isinstance(value, str) and value:
            return value
    return None


def _manifest_system(spec: AdapterSpec) -> str | None:
    manifest = spec.manifest or {}
    for key in ("system", "default_system"):
        value = (
            manifest.get(key)
            or (manifest.get("hyperparameters") or {}).get(key)
            or (manifest.get("template") if isinstance(manifest.get("template"), dict) else {}).get(key)
        )
        if isinstance(value, str) and value.strip():
            return value
    return None


def _dir_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def load_tokenizer(plan: MergePlan):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_dir)
    if plan.chat_template:
        tokenizer.chat_template = plan.chat_template
    return tokenizer


def end_of_turn_token(tokenizer, template: str | None) -> str | None:
    """The special token the template writes right after an assistant message (`<|im_end|>` for ChatML)."""
    if not template:
        return None
    marker = "XYZZY-END-OF-TURN"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # a template that refuses this conversation shape names no end token
        return None
    after = text.split(marker, 1)[-1].lstrip(" ")
    specials = sorted(
        (t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True
    )
    return next((tok for tok in specials if after.startswith(tok)), None)


def generation_eos_ids(tokenizer, template: str | None) -> list[int]:
    """EOS ids for generation_config.json: the template's end-of-turn token first, then the tokenizer's EOS."""
    ids: list[int] = []
    eot = end_of_turn_token(tokenizer, template)
    for tid in (tokenizer.convert_tokens_to_ids(eot) if eot else None, tokenizer.eos_token_id):
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    if not ids:
        raise ExportError("the tokenizer has no EOS token and the chat template names no end-of-turn token")
    return ids


def load_with_adapters(plan: MergePlan):
    """Base in float32 with every adapter loaded and active (unmerged): the verification reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plan.base.path, dtype=torch.float32)
    shapes = {
        name: (mod.out_features, mod.in_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    for spec in plan.specs:
        check_adapter_shapes(spec, shapes)
    if not plan.specs:  # a full checkpoint: the reference is the model itself
        return model.eval()
    first, rest = plan.specs[0], plan.specs[1:]
    peft_model = PeftModel.from_pretrained(model, first.path, adapter_name=first.name)
    for spec in rest:
        peft_model.load_adapter(spec.path, adapter_name=spec.name)
    if rest:
        peft_model.base_model.set_adapter([s.name for s in plan.specs])
    return peft_model.eval()


def merge(peft_model):
    """Fold every active adapter into the base weights; returns the plain transformers model."""
    import torch

    # Hundreds of tiny B@A products: thread start-up costs more than the maths, and on a busy 2-core
    # machine OpenMP's barriers made the default model's merge 10x slower (10 s vs 1.1 s) than 1 thread.
    if not hasattr(peft_model, "merge_and_unload"):  # a full checkpoint: nothing to fold in
        return peft_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return peft_model.merge_and_unload(progressbar=False)
    finally:
        torch.set_num_threads(threads)


def save_merged(model, tokenizer, out: Path, eos_ids: list[int], max_shard_size: str = "2GB") -> None:
    """Write the merged float32 checkpoint, tokenizer, chat template and generation_config.json."""
    import torch

    model.config.dtype = torch.float32
    gen = model.generation_config
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
