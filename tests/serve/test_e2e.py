"""End to end: a real `llm-serve` process with the real default model and a real LoRA adapter,
driven by the official `openai` client (max_retries=0), as a user would."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.adapters import make_lora_adapter
from tests.helpers.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
KEY = "test-key"
BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter_dir(e2e_adapter):
    return e2e_adapter


@pytest.fixture(scope="module")
def server(e2e_server):
    """The session's shared server (tests/serve/conftest.py): `persona`, the key, 4 sequences."""
    return e2e_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=600)


def test_models(client, adapter_dir):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "persona"}
    assert models["persona"].parent == BASE and models["persona"].root == str(adapter_dir.resolve())


def test_chat_base_and_adapter(client):
    base = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in base.choices[0].message.content
    assert base.choices[0].finish_reason == "stop"  # stopped on <|im_end|>, not max_tokens
    assert base.usage.completion_tokens < 20
    tuned = client.chat.completions.create(model="persona", messages=QUESTION, temperature=0, max_tokens=20)
    assert tuned.model == "persona" and tuned.choices[0].message.content


def test_stream_matches_non_stream(client):
    full = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=12)
    stream = client.chat.completions.create(
        model=BASE,
        messages=QUESTION,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=BASE, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(
        t.logprob <= 0 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content
    )  # greedy


def test_completions_echo_logprobs_as_lm_eval_sends(client, server):
    tok = httpx.post(
        server.base_url + "/tokenize",
        json={"prompt": "The capital of France is Paris"},
        headers={"Authorization": f"Bearer {KEY}"},  # the tokenizer endpoints sit behind the key
    ).json()["tokens"]
    r = client.completions.create(
        model="persona", prompt=[tok], max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tok) + 1 and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert r.choices[0].text.startswith("The capital of France is Paris")


def test_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert e.value.body["param"] == "model" and "persona" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=QUESTION, temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "word " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded" and "4096" in e.value.body["message"]
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=b"x" * (5 * 1024 * 1024),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_concurrent_adapters_and_metrics(client, server):
    results = {}

    def ask(model):
        r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8)
        results[model + str(threading.get_ident())] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(m,)) for m in (BASE, "persona", BASE, "persona")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    metrics = httpx.get(server.base_url + "/metrics").text
    # /metrics is open while the server has a key: adapters are labelled by hash, never by name.
    label = "adapter-" + hashlib.sha256(b"persona").hexdigest()[:10]
    assert (
        f'llm_serve_requests_total{{endpoint="/v1/chat/completions",model="{label}",status="200"}}' in metrics
    )
    assert "persona" not in metrics
    assert "llm_serve_time_to_first_token_seconds_bucket" in metrics


def run_cli(*args) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "llm-serve")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_preflight_refuses_bad_adapters(tmp_path, adapter_dir):
    missing = run_cli("--adapter", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    r = run_cli("--adapter", str(pickled))
    assert r.returncode == 2 and "pickled" in r.stderr and "safetensors" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes(
        (adapter_dir / "adapter_model.safetensors").read_bytes()
    )
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-7B"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_cli("--adapter", f"o={other}")
    assert r.returncode == 2 and "Qwen/Qwen2.5-7B" in r.stderr and "--allow-base-mismatch" in r.stderr


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-e2e") / "t", seed=1)


def test_disconnect_cancels_and_queue_overflow_is_429(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--max-num-seqs", "1", "--max-queue", "1"]
    with start_server(args) as s:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        long = {
            "model": c.models.list().data[0].id,
            "messages": QUESTION,
            "max_tokens": 3000,
            "temperature": 0,
        }
        stream = c.chat.completions.create(**long, stream=True)
        next(iter(stream))  # generation is running in the only slot
        waiting = threading.Thread(
            target=lambda: _swallow(lambda: c.chat.completions.create(**{**long, "max_tokens": 5}))
        )
        waiting.start()
        time.sleep(1.0)  # the second request now waits in the queue (size 1)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(**long)
        stream.close()  # client goes away: its slot must be freed
        waiting.join(60)
        assert not waiting.is_alive()
        deadline = time.time() + 20
        while time.time() < deadline:
            m = httpx.get(s.base_url + "/metrics").text
            if "llm_serve_running_requests 0.0" in m:
                break
            time.sleep(0.2)
        assert "llm_serve_running_requests 0.0" in m


def _swallow(fn):
    with contextlib.suppress(openai.APIError):
        fn()


def test_sigterm_lets_inflight_requests_finish(tiny_model_dir):
    s = start_server(["--model", str(tiny_model_dir), "--shutdown-timeout", "30"])
    c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = c.models.list().data[0].id
    result = {}

    def ask():
        result["r"] = c.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=1500, temperature=0, extra_body={"ignore_eos": True}
        )

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.time() + 60
    while (
        time.time() < deadline
        and "llm_serve_running_requests 1.0" not in httpx.get(s.base_url + "/metrics").text
    ):
        time.sleep(0.05)
    rc = s.stop(timeout=60)  # SIGTERM while the request is being generated
    t.join(10)
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM.
    assert rc in (0, -15), s.log()[-2000:]
    assert "Finished server process" in s.log()
    assert result["r"].choices[0].finish_reason == "length" and result["r"].usage.completion_tokens == 1500
