"""End to end on the real default model: `llm-export` (a real subprocess) merges an adapter and writes a
q8_0 GGUF + Modelfile; `llm-serve --model DIR` and `llm-serve --model FILE.gguf` serve both, and the
official openai client gets a chat reply that stops on EOS from each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _chat(server, prompt: str):
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=48
    ).choices[0]


def test_export_default_model_then_serve_dir_and_gguf(tmp_path, default_model):
    from tests.helpers.adapters import make_lora_adapter
    from tests.helpers.server import start_server

    # A gentle adapter: it measurably changes the logits but keeps the model answering sensibly.
    adapter = make_lora_adapter(default_model.path, tmp_path / "adapter", seed=0, scale=0.005)
    out = tmp_path / "demo-merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLM_SERVE_HOME": str(tmp_path / "home")}
    exe = Path(sys.executable).parent / "llm-export"
    cmd = [
        str(exe),
        "--adapter",
        f"demo={adapter}",
        "--out",
        str(out),
        "--gguf",
        "q8_0",
        "--modelfile",
        "--max-new-tokens",
        "8",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "export_report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["merged.max_abs_logit_diff"]["value"] < 1e-3
    assert checks["merged.greedy_tokens_identical"]["passed"]
    assert checks["gguf[q8_0].top1_agreement"]["value"] >= 0.9
    assert checks["gguf[q8_0].eos_token_id"]["value"] == 2
    assert checks["gguf[q8_0].chat_prompt_tokens"]["value"] is True
    gguf = out / "gguf" / "demo-merged-q8_0.gguf"
    assert (out / "gguf" / "Modelfile").read_text().startswith(f"FROM ./{gguf.name}")

    prompt = report["prompts"][0]  # "What is the capital of France?"
    with start_server(["--model", str(out)], env=env) as server:
        choice = _chat(server, prompt)
    assert choice.finish_reason == "stop", choice.message.content
    assert choice.message.content.startswith(report["replies"][0].strip()[:12])
    assert "Paris" in choice.message.content

    with start_server(["--model", str(gguf)], env=env, timeout=600) as server:
        choice = _chat(server, prompt)
    assert choice.finish_reason == "stop", choice.message.content
    assert "Paris" in choice.message.content
