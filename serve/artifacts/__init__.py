"""The artefacts that pass between train, export, serve, eval and the UI, one module each.

Each module is the only writer and the only reader of its artefact, so a change to what a folder or
file holds is made in one place:

- `run_manifest`: `run_manifest.json`, what an llm-train run was made from (typed, versioned).
- `model_folder`: the serving facts of a model or adapter folder (chat templates, EOS/stop ids,
  generation config, tokenizer, LoRA config); what an adapter folder holds and who reads it.
- `trainer_log`: LLaMA-Factory's `trainer_log.jsonl` (loss per step) as rows and loss curves.
- `dataset_registry`: `dataset_info.json` entries (LLaMA-Factory's dataset registry).
- `publish`: how a folder lands on disk (staged beside its target, fsynced, renamed) and how the
  stagings of dead runs are cleaned up.
- `provenance`: sha256 of files and checkpoints, and package versions, for manifests and reports.

Dependency-free at import (no torch or transformers), so every package of the project can use them.
"""
