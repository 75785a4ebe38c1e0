"""Merge LoRA adapters into full float32 weights with PEFT, with the template the adapters were trained with.

Used by `pipeline.run_export`: `resolve_base` finds the base the adapters record (run manifest, then
adapter_config.json) and refuses a mismatch naming both; `load_with_adapters` builds base+adapters
(all active, the reference the merge is verified against); `merge` folds them into the weights;
`save_merged` writes safetensors shards, the tokenizer, the chat template and a generation_config.json
whose EOS ids are the ones llm-serve stops on (serve.artifacts.model_folder.stop_token_ids).
"""

from __future__ import annotations

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
from serve.artifacts import model_folder
from serve.artifacts.provenance import model_sha256
from serve.cli_runner import UserError
from serve.models import ModelNotFoundError, ResolvedModel, resolve_model

DEFAULT_BASE_NAMES = {"HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"}


class ExportError(UserError, ValueError):
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
    if spec.manifest is not None:
        recorded = spec.manifest.base_model
        if recorded.path and Path(recorded.path).exists():
            return recorded.path
        if recorded.name:
            return recorded.name
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
    recorded = spec.manifest.base_model.sha256 if spec.manifest is not None else ""
    if not recorded:
        return
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
    facts = model_folder.read_folder(resolved.path)  # also its run manifest, when llm-train made it
    system = facts.manifest.template.default_system if facts.manifest is not None else None
    return MergePlan([], resolved, resolved.path, facts.chat_template, system or None)


def plan_merge(adapter_args: list[str], base: str | None = None) -> MergePlan:
    """Read adapters, pick base, tokenizer, chat template and system prompt; loads no weights."""
    specs = load_specs(adapter_args)
    resolved = resolve_base(specs, base)
    templates = {s.name: s.chat_template for s in specs}
    distinct = {t for t in templates.values() if t}
    if len(distinct) > 1:
        names = [n for n, t in templates.items() if t]
        raise ExportError(
            f"adapters {names} were trained with different chat templates; merge adapters trained "
            "with the same template"
        )
    tokenizer_dir = next(
        (s.path for s in reversed(specs) if s.facts is not None and s.facts.has_tokenizer), resolved.path
    )
    template = (
        distinct.pop()
        if distinct
        else model_folder.read_folder(tokenizer_dir).chat_template
        or model_folder.read_folder(resolved.path).chat_template
    )
    system = next((_manifest_system(s) for s in reversed(specs) if _manifest_system(s)), None)
    return MergePlan(specs, resolved, tokenizer_dir, template, system)


def _manifest_system(spec: AdapterSpec) -> str | None:
    """The system prompt the run trained with (llm-train records it with the template)."""
    system = spec.manifest.template.default_system if spec.manifest is not None else None
    return system if system and system.strip() else None


def load_tokenizer(plan: MergePlan):
    return model_folder.load_tokenizer(plan.tokenizer_dir, plan.chat_template)


def generation_eos_ids(tokenizer, template: str | None, base: ResolvedModel) -> list[int]:
    """EOS ids for generation_config.json: what llm-serve stops on, the template's end-of-turn token first."""
    ids = model_folder.read_folder(base.path).stop_token_ids(tokenizer, template)
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
