"""The GGUF `llm-export` writes, served by llama.cpp's own `llama-server`: it loads, greedy-decodes the
merged model's tokens, and its chat endpoint (the GGUF's embedded template) gives the merged model's
reply. Needs the optional llama.cpp build (`make llama-cpp`, ~8 min on 2 cores, cached under
$LLM_SERVE_HOME); skipped, naming that command, when it is not built."""

from __future__ import annotations

import json

import pytest

from serve import llama_server
from serve.bench import peers
from train.export.cli import main

pytestmark = pytest.mark.slow

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llama_server_binary():
    binary = llama_server.server_binary()
    if binary is None:
        pytest.skip(llama_server.missing_reason())
    return binary


def test_exported_f32_gguf_in_llama_cpp_matches_the_merged_model(
    tmp_path, default_model, llama_server_binary
):
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.adapters import make_lora_adapter
    from train.export.verify import greedy, render_prompts

    adapter = make_lora_adapter(default_model.path, tmp_path / "adapter", seed=0, scale=0.005)
    out = tmp_path / "merged"
    argv = [
        "--adapter",
        str(adapter),
        "--out",
        str(out),
        "--gguf",
        "f32",
        "--max-new-tokens",
        str(NEW_TOKENS),
    ]
    assert main(argv) == 0
    report = json.loads((out / "export_report.json").read_text())
    gguf = out / "gguf" / "merged-f32.gguf"

    # The merged model's greedy tokens for the first verification prompt, chat template applied.
    tok = AutoTokenizer.from_pretrained(out)
    prompt_ids = render_prompts(tok, tok.chat_template)[0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    eos = report["eos_token_ids"]
    want = greedy(model, prompt_ids, NEW_TOKENS, eos)
    want = want[:-1] if want and want[-1] in eos else want  # llama.cpp does not return the EOS token
    want_text = report["replies"][0]
    assert len(want) >= 4 and len(want_text.strip()) >= 10, (want, want_text)  # a real reply to compare

    port = peers.free_port()
    cmd = llama_server.server_command(
        llama_server_binary, gguf, port, threads=2, parallel=1, ctx_per_seq=512, alias="merged"
    )
    spec = peers.ServerSpec(
        name="llama-server", cmd=cmd, port=port, ready_path="/health", start_timeout_s=120
    )
    with peers.ServerProcess(spec, tmp_path / "llama-server.log") as proc:
        proc.wait_ready()
        base = spec.base_url
        got = httpx.post(
            f"{base}/completion",
            json={"prompt": prompt_ids, "n_predict": NEW_TOKENS, "temperature": 0, "top_k": 1,
                  "return_tokens": True, "cache_prompt": False},
            timeout=120,
        ).json()  # fmt: skip
        chat = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "merged", "messages": [{"role": "user", "content": report["prompts"][0]}],
                  "temperature": 0, "max_tokens": NEW_TOKENS},
            timeout=120,
        ).json()  # fmt: skip
    # f32 is the same arithmetic up to summation order: every greedy token agrees.
    assert got["tokens"][: len(want)] == want, (tok.decode(got["tokens"]), tok.decode(want))
    reply = chat["choices"][0]["message"]["content"]
    assert reply.strip() == want_text.strip(), (reply, want_text)
