"""Load an exported GGUF with llama.cpp (llama-cpp-python) and compare its greedy reply with the merged
model's. llama-cpp-python is an optional, source-built extra: without it this test is skipped."""

from __future__ import annotations

import json

import pytest

from train.export.cli import main

pytestmark = pytest.mark.slow


def test_llama_cpp_greedy_reply_matches(tmp_path, default_model):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional extra)")
    from tests.helpers.adapters import make_lora_adapter

    adapter = make_lora_adapter(default_model.path, tmp_path / "adapter", seed=0, scale=0.005)
    out = tmp_path / "merged"
    assert main(["--adapter", str(adapter), "--out", str(out), "--gguf", "f16"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    llm = llama_cpp.Llama(model_path=str(out / "gguf" / "merged-f16.gguf"), n_ctx=512, verbose=False)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": report["prompts"][0]}], temperature=0.0, max_tokens=16
    )["choices"][0]["message"]["content"]
    assert reply.strip().startswith(report["replies"][0].strip()[:20])
