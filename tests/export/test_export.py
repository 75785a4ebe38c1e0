"""`llm-export` end to end on tiny models: merged logits equal base+adapter (checked here, independently
of the export's own report), GGUF read back, atomic output, refusals, and failed verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.export.cli import main
from train.export.config import ExportConfig
from train.export.pipeline import VerificationError, run_export


def _logits(model_or_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, Path):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_merge_on_the_real_tokenizer(tmp_path, tiny_model_dir, capsys):
    """The real SmolLM2 tokenizer and ChatML template on a tiny random Llama (GGUF: see the slow test)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.adapters import make_lora_adapter

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=0)
    out = tmp_path / "merged"
    assert main(["--adapter", f"demo={adapter}", "--out", str(out), "--max-new-tokens", "8"]) == 0
    assert "all checks passed" in capsys.readouterr().out

    report = json.loads((out / "export_report.json").read_text())
    assert report["status"] == "passed" and report["failed_checks"] == []
    assert report["eos_tokens"] == ["<|im_end|>"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert not list(tmp_path.glob(".merged.*")), "temporary directory left behind"

    # Independent of the report: merged weights == base + adapter on a chat prompt.
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    want = _logits(with_adapter, ids)
    assert float((want - _logits(tiny_model_dir, ids)).abs().max()) > 1e-3, "adapter must change the logits"
    assert float((_logits(out, ids) - want).abs().max()) < 1e-4


def test_export_with_gguf_and_modelfile(tmp_path, small_llama_adapter):
    out = tmp_path / "merged"
    rc = main(["--adapter", str(small_llama_adapter), "--out", str(out), "--gguf", "q8_0", "--modelfile"])
    assert rc == 0
    report = json.loads((out / "export_report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("eos_token_id", "chat_template", "tokenizer", "chat_prompt_tokens", "top1_agreement"):
        assert checks[f"gguf[q8_0].{name}"]["passed"], checks[f"gguf[q8_0].{name}"]
    assert checks["gguf[q8_0].top1_agreement"]["value"] >= 0.9
    gguf = out / "gguf" / "merged-q8_0.gguf"
    assert report["gguf"]["q8_0"]["size_bytes"] == gguf.stat().st_size
    assert report["gguf"]["q8_0"]["tensor_types"]["Q8_0"] > 0
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./merged-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_export_has_ordinary_modes_and_one_set_of_stop_ids(tmp_path, small_llama_adapter):
    """Files readable by others like any checkpoint (model.safetensors was 0600), and the merged folder's
    generation_config, the GGUF's EOS, the Modelfile's stops and the server's stop set all agree."""
    import os
    import stat

    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from serve.artifacts.model_folder import read_folder

    old = os.umask(0o022)
    try:
        out = tmp_path / "merged"
        rc = main(["--adapter", str(small_llama_adapter), "--out", str(out), "--gguf", "f32", "--modelfile"])
    finally:
        os.umask(old)
    assert rc == 0
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes and all(m == (0o755 if (out / name).is_dir() else 0o644) for name, m in modes.items()), modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

    tokenizer = AutoTokenizer.from_pretrained(out)
    served = read_folder(out).stop_token_ids(tokenizer)  # what llm-serve --model OUT stops on
    generation = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert served == (generation if isinstance(generation, list) else [generation])
    reader = GGUFReader(out / "gguf" / "merged-f32.gguf")
    assert int(reader.fields["tokenizer.ggml.eos_token_id"].contents()) == served[0]
    stops = [
        line.split(" ", 2)[2].strip('"')
        for line in (out / "gguf" / "Modelfile").read_text().splitlines()
        if line.startswith("PARAMETER stop")
    ]
    assert stops == tokenizer.convert_ids_to_tokens(served)


def test_two_adapters_are_applied_in_order(tmp_path, small_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers.adapters import make_lora_adapter

    a = make_lora_adapter(small_llama, tmp_path / "a", seed=1)
    b = make_lora_adapter(small_llama, tmp_path / "b", seed=2, targets=("q_proj", "v_proj"))
    out = tmp_path / "merged"
    report = run_export(ExportConfig(adapters=[str(a), str(b)], out=out, max_new_tokens=4))
    assert report["status"] == "passed"

    # Reference built the other way: merge a, then load b on the result and merge it.
    model = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, a).merge_and_unload()
    model = PeftModel.from_pretrained(model, b).merge_and_unload()
    ids = [1, 5, 17, 42, 99, 2]
    assert float((_logits(out, ids) - _logits(model, ids)).abs().max()) < 1e-4


def test_existing_output_is_refused_without_overwrite(tmp_path, small_llama_adapter, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["--adapter", str(small_llama_adapter), "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_the_directory(tmp_path, small_llama_adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc = main(
        ["--adapter", str(small_llama_adapter), "--out", str(out), "--overwrite", "--max-new-tokens", "4"]
    )
    assert rc == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_base_mismatch_names_both(tmp_path, small_llama, small_llama_adapter, small_tokenizers, capsys):
    from tests.export.tiny_models import tiny_checkpoint

    other = tiny_checkpoint("llama", small_tokenizers["bpe"], tmp_path / "other-base", seed=7)
    rc = main(["--adapter", f"x={small_llama_adapter}", "--base", str(other), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(small_llama) in err and "other-base" in err


def test_modelfile_needs_a_gguf(tmp_path, small_llama_adapter, capsys):
    assert main(["--adapter", str(small_llama_adapter), "--out", str(tmp_path / "o"), "--modelfile"]) == 2
    assert "--gguf" in capsys.readouterr().err


def test_corrupted_merged_tensor_fails_verification(tmp_path, small_llama_adapter, monkeypatch, capsys):
    """Break the saved merged weights (as a bad merge or a truncated write would): exit 1, nothing installed."""
    from safetensors.torch import load_file, save_file

    import train.export.merge as merge_mod

    real_save = merge_mod.save_merged

    def save_then_corrupt(model, tokenizer, out, *args, **kwargs):
        real_save(model, tokenizer, out, *args, **kwargs)
        weights = load_file(out / "model.safetensors")
        weights["model.layers.0.self_attn.o_proj.weight"] *= 1.5
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(merge_mod, "save_merged", save_then_corrupt)
    out = tmp_path / "merged"
    rc = main(["--adapter", str(small_llama_adapter), "--out", str(out), "--max-new-tokens", "4"])
    assert rc == 1
    assert "merged.max_abs_logit_diff" in capsys.readouterr().err
    assert not out.exists()
    report = json.loads((tmp_path / "merged.rejected" / "export_report.json").read_text())
    assert "merged.max_abs_logit_diff" in report["failed_checks"]


def test_corrupted_gguf_tensor_fails_verification(tmp_path, small_llama_adapter):
    import numpy as np
    from gguf import GGUFReader

    def corrupt(kind: str, path: Path) -> None:
        if kind != "gguf":
            return
        reader = GGUFReader(path, "r+")
        tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        tensor.data[...] = np.asarray(tensor.data) * -1.0
        del reader

    out = tmp_path / "merged"
    with pytest.raises(VerificationError) as info:
        run_export(
            ExportConfig(adapters=[str(small_llama_adapter)], out=out, gguf=["f32"], max_new_tokens=4),
            after_write=corrupt,
        )
    assert "gguf[f32].max_abs_logit_diff" in info.value.failed
    assert "merged.max_abs_logit_diff" not in info.value.failed
    assert not out.exists()


def test_base_with_other_weights_than_the_manifest_records_is_refused(tmp_path, small_llama, capsys):
    from tests.helpers.adapters import make_lora_adapter

    adapter = make_lora_adapter(small_llama, tmp_path / "a", seed=3)
    manifest = {"base_model": {"name": str(small_llama), "path": str(small_llama), "sha256": "0" * 64}}
    (adapter / "run_manifest.json").write_text(json.dumps(manifest))
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "sha256 000000000000" in err and str(small_llama) in err


def test_unsupported_architecture_fails_before_merging(tmp_path, small_llama_adapter, small_llama, capsys):
    """No weights load: the GGUF architecture check runs before the merge."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(small_llama, base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["PhiForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))
    adapter = shutil.copytree(small_llama_adapter, tmp_path / "adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    rc = main(["--adapter", str(adapter), "--out", str(tmp_path / "o"), "--gguf", "f16"])
    assert rc == 2
    assert "PhiForCausalLM" in capsys.readouterr().err
