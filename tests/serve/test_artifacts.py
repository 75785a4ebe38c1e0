"""The artefact contracts (serve.artifacts): publish, run manifest, folder facts, dataset registry, trainer log."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from serve.artifacts.dataset_registry import DatasetEntry, DatasetInfoError, register_entries
from serve.artifacts.model_folder import FolderError, read_adapter_config, read_folder, stop_token_ids
from serve.artifacts.publish import FolderBusyError, clean_stale, lock_dir, publish_dir, staged_dir
from serve.artifacts.run_manifest import (
    SCHEMA_VERSION,
    ManifestError,
    RunManifest,
    read_manifest,
    write_manifest,
)

# A manifest exactly as llm-train wrote it before the manifest was typed (schema_version 1).
V1_MANIFEST = {
    "schema_version": 1,
    "created_at": "2026-12-02T03:04:09+0000",
    "output_dir": "/tmp/out",
    "base_model": {"name": "default", "path": "/models/SmolLM2-135M-Instruct-f32", "sha256": "a6" * 32},
    "stage": "sft",
    "finetuning_type": "lora",
    "template": {
        "name": "smollm2",
        "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "matches_tokenizer": True,
        "keeps_tokenizer_template": True,
        "chat_template_sha256": "87" * 32,
        "saved_with_adapter": True,
        "saved_matches_base": True,
    },
    "datasets": [
        {"name": "d", "split": "train", "file": "/d.json", "sha256": "b9" * 32, "format": "alpaca", "rows": 3}
    ],
    "hyperparameters": {"learning_rate": 0.0005, "lora_rank": 8},
    "metrics": {"final_loss": 0.85, "steps": 3, "tokens_per_second": 55.5},
    "packages": {"llm-serve": "0.1.0", "torch": "2.9.1"},
    "command": ["llm-train", "c.yaml"],
}


# ----------------------------------------------------------------------------- publish


def test_publish_swaps_atomically(tmp_path):
    out, stage = tmp_path / "a", tmp_path / ".a.partial"
    out.mkdir()
    (out / "old").write_text("old")
    stage.mkdir()
    (stage / "new").write_text("new")
    publish_dir(stage, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_published_files_get_ordinary_modes(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out") as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o755  # mkdtemp makes 0700
            (tmp / "model.safetensors").write_bytes(b"w")
            (tmp / "model.safetensors").chmod(0o600)  # what some writers leave (a private temp file)
            (tmp / "gguf").mkdir(mode=0o700)
            (tmp / "gguf" / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "gguf" / "run.sh").chmod(0o700)
            publish_dir(tmp, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*")}
    assert modes == {"model.safetensors": 0o644, "gguf": 0o755, "run.sh": 0o755}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_target_and_no_staging(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "keep").read_text() == "old"


def _hold_lock(path):
    """A live process that owns `path` (holds its flock) until stdin closes."""
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow  # spawns a process to own a folder
def test_stale_stagings_are_removed_but_never_a_live_runs(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / ".out.tmp-dead1234"  # a killed run: nobody holds its lock
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    legacy = tmp_path / ".out.k3j_9x2a"  # an older version's bare mkdtemp staging
    legacy.mkdir()
    live = tmp_path / ".out.tmp-live5678"
    live.mkdir()
    kept = [tmp_path / ".out.partial", tmp_path / "out.rejected", tmp_path / ".other.tmp-1"]
    for path in kept:
        path.mkdir()
    owner = _hold_lock(live)
    try:
        assert sorted(clean_stale(target)) == sorted([dead, legacy])
        assert live.is_dir() and all(p.is_dir() for p in kept)
        with pytest.raises(FolderBusyError, match="right now; wait for it"), lock_dir(live):
            pass
    finally:
        owner.stdin.close()
        owner.wait(10)
    assert clean_stale(target) == [live]  # its owner has exited


def test_staged_dir_cleans_up_after_a_dead_run_first(tmp_path):
    dead = tmp_path / ".out.tmp-abcd"
    dead.mkdir()
    with staged_dir(tmp_path / "out") as tmp:
        assert not dead.exists() and tmp.name.startswith(".out.tmp-")


# ----------------------------------------------------------------------------- run manifest


def test_v1_manifest_reads_and_round_trips(tmp_path):
    (tmp_path / "run_manifest.json").write_text(json.dumps(V1_MANIFEST))
    manifest = read_manifest(tmp_path)
    assert manifest.schema_version == SCHEMA_VERSION == 1
    assert manifest.base_model.name == "default" and manifest.template.default_system.startswith("You are")
    assert manifest.datasets[0].rows == 3 and manifest.metrics["final_loss"] == 0.85
    out = tmp_path / "copy"
    write_manifest(out, manifest)
    assert json.loads((out / "run_manifest.json").read_text()) == V1_MANIFEST
    assert read_manifest(tmp_path / "nothing-here") is None


def test_a_future_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "run_manifest.json").write_text(json.dumps({**V1_MANIFEST, "schema_version": 7}))
    with pytest.raises(ManifestError, match=r"run_manifest.json has schema_version 7, .* upgrade llm-serve"):
        read_manifest(tmp_path)


def test_a_broken_manifest_names_the_file_and_the_key(tmp_path):
    (tmp_path / "run_manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="run_manifest.json is not readable JSON"):
        read_manifest(tmp_path)
    (tmp_path / "run_manifest.json").write_text(json.dumps({**V1_MANIFEST, "base_model": {"nmae": "x"}}))
    with pytest.raises(ManifestError, match="base_model.name: Field required"):
        read_manifest(tmp_path)


def test_manifest_fields_are_typed():
    with pytest.raises(ValueError):
        RunManifest.model_validate({**V1_MANIFEST, "surprise": 1})  # extra keys are refused


# ----------------------------------------------------------------------------- folder facts


def test_folder_facts_read_every_template_source(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {"content": "<|im_end|>", "special": True},
                "chat_template": [
                    {"name": "default", "template": "from-json"},
                    {"name": "tool_use", "template": "tools"},
                ],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    facts = read_folder(tmp_path)
    assert facts.chat_template == "from-json" and facts.chat_templates["tool_use"] == "tools"
    assert facts.eos_token == "<|im_end|>" and facts.generation_eos_ids == [2, 7]
    assert not facts.has_tokenizer and facts.manifest is None
    (tmp_path / "chat_template.jinja").write_text("from-jinja")  # what transformers writes today wins
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("rag")
    facts = read_folder(tmp_path)
    assert facts.chat_template == "from-jinja" and facts.chat_templates["rag"] == "rag"
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(FolderError, match="tokenizer_config.json is not valid JSON"):
        read_folder(tmp_path)


def test_adapter_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 4, "target_modules": "q_proj", "base_model_name_or_path": "b"})
    )
    cfg = read_adapter_config(tmp_path)
    assert (cfg.peft_type, cfg.rank, cfg.alpha, cfg.target_modules, cfg.base_model) == (
        "LORA",
        4,
        4.0,
        ["q_proj"],
        "b",
    )


def test_stop_ids_put_the_templates_end_of_turn_first(tmp_path):
    from transformers import AutoTokenizer

    from tests.export.tiny_models import MISTRAL, byte_bpe_tokenizer

    tok = AutoTokenizer.from_pretrained(byte_bpe_tokenizer(tmp_path / "bpe"))  # ChatML, eos <|im_end|>
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert stop_token_ids(tok, tok.chat_template) == [im_end]
    assert stop_token_ids(tok, tok.chat_template, eos_tokens=["<|im_start|>", "<nope>"]) == [im_end, im_start]
    assert stop_token_ids(tok, None, extra_ids=[5]) == [im_end, 5]
    # A template that ends turns with the EOS variable: found by rendering, not by its text.
    tok.eos_token = "<|im_start|>"
    assert stop_token_ids(tok, MISTRAL) == [im_start]


# ----------------------------------------------------------------------------- dataset registry


def test_register_entries_keeps_others_and_only_writes_changes(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    entry = DatasetEntry(
        "kto.jsonl", formatting="sharegpt", columns={"messages": "messages", "kto_tag": "label"}
    )
    assert register_entries(tmp_path, {"fb": entry}) == {"fb": "added"}
    before = (tmp_path / "dataset_info.json").stat().st_mtime_ns
    assert register_entries(tmp_path, {"fb": entry}) == {"fb": "unchanged"}
    assert (tmp_path / "dataset_info.json").stat().st_mtime_ns == before
    entry.ranking = True
    assert register_entries(tmp_path, {"fb": entry}) == {"fb": "updated"}
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"} and info["fb"]["ranking"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset_info.json"]  # no lock or temp file
    (tmp_path / "dataset_info.json").write_text("[1]")
    with pytest.raises(DatasetInfoError, match="must be a JSON object"):
        register_entries(tmp_path, {"fb": entry})
