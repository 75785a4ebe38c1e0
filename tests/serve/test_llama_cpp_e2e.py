"""`llm-serve --engine llama-cpp` end to end: a real server process in front of a real llama-server
(`make llama-cpp`), driven by the official `openai` client and set against our own engine (the
session's shared `e2e_server`) on the same default model and the same LoRA adapter.

Skipped, naming `make llama-cpp`, when llama-server is not built (the build takes ~15 minutes)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from serve import llama_server
from tests.helpers.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
KEY = "test-key"
BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cpp_server(e2e_adapter):
    if llama_server.server_binary() is None:
        pytest.skip(llama_server.missing_reason())
    args = ["--engine", "llama-cpp", "--adapter", f"persona={e2e_adapter}", "--api-key", KEY]
    args += ["--max-num-seqs", "4", "--max-model-len", "2048"]
    with start_server(args, timeout=900) as server:
        yield server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def cpp(cpp_server):
    return _client(cpp_server)


@pytest.fixture(scope="module")
def ours(e2e_server):
    return _client(e2e_server)


def test_greedy_chat_matches_our_engine(cpp, ours):
    assert {m.id for m in cpp.models.list().data} == {BASE, "persona"}
    a = cpp.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=24)
    b = ours.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=24)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "Paris" in a.choices[0].message.content
    assert a.choices[0].finish_reason == b.choices[0].finish_reason == "stop"  # on <|im_end|>
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (
        b.usage.prompt_tokens,
        b.usage.completion_tokens,
    )
    tuned = cpp.chat.completions.create(model="persona", messages=QUESTION, temperature=0, max_tokens=24)
    assert tuned.choices[0].message.content != a.choices[0].message.content  # the adapter is applied


@pytest.mark.parametrize("model", [BASE, "persona"])
def test_logprobs_match_our_engine(cpp, ours, model):
    """Same tokens and log-probabilities a rounding apart: the GGUF, the LoRA GGUF (its scaling and
    q/k permutation) and the request mapping give our engine's distribution. The test adapter's random
    lora_B makes near-ties, so only the first tokens, before greedy paths may part, are compared."""
    kwargs = dict(prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3)
    a = cpp.completions.create(model=model, **kwargs).choices[0].logprobs
    b = ours.completions.create(model=model, **kwargs).choices[0].logprobs
    assert a.tokens == b.tokens
    assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=5e-3)
    for top_a, top_b in zip(a.top_logprobs, b.top_logprobs, strict=True):
        assert len(top_a) == 3 and list(top_a)[0] == list(top_b)[0]
        assert list(top_a.values()) == pytest.approx(list(top_b.values()), abs=5e-3)


def test_stream_stop_string_and_usage(cpp):
    full = cpp.completions.create(model=BASE, prompt="Once upon a time", max_tokens=40, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    stop = text.strip().split()[3]  # a word in the middle of the greedy text
    stream = cpp.completions.create(
        model=BASE, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop], stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == text[: text.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(cpp):
    kwargs = dict(model=BASE, prompt="My favourite colour is", max_tokens=12, temperature=1.0, seed=7)
    a, b = (cpp.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert a == b


def test_json_schema_is_followed(cpp):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    r = cpp.chat.completions.create(
        model="persona",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "population"} and isinstance(data["population"], int)


def test_what_llama_cpp_cannot_do_is_refused_naming_the_field(cpp):
    with pytest.raises(openai.BadRequestError) as e:
        cpp.completions.create(model=BASE, prompt="hi", max_tokens=1, echo=True, logprobs=1)
    assert e.value.body["param"] == "echo" and "--engine hf" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        cpp.chat.completions.create(
            model=BASE,
            messages=QUESTION,
            max_tokens=3,
            extra_body={"structured_outputs": {"regex": "(yes|no)"}},
        )
    assert e.value.body["param"].startswith("structured_outputs") and "--engine hf" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        cpp.chat.completions.create(model="nope", messages=QUESTION)


def test_concurrent_mixed_requests_and_a_client_that_leaves(cpp, cpp_server):
    results, errors = {}, []

    def ask(i, model):
        try:
            r = cpp.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
            results[i] = (model, r.choices[0].message.content)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # A stream closed after its first tokens: llama-server must drop it and keep serving the others.
    with httpx.stream(
        "POST",
        cpp_server.base_url + "/v1/completions",
        json={"model": BASE, "prompt": "Count to a thousand:", "max_tokens": 2000, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        next(r.iter_lines())
    threads = [threading.Thread(target=ask, args=(i, [BASE, "persona"][i % 2])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert len({text for model, text in results.values() if model == BASE}) == 1  # greedy: same answer
    assert len({text for model, text in results.values() if model == "persona"}) == 1


def test_llama_server_gone_means_503_not_a_hang(e2e_adapter):
    """Its own server: killing the llama-server child must turn /health and requests into 503s."""
    if llama_server.server_binary() is None:
        pytest.skip(llama_server.missing_reason())
    with start_server(["--engine", "llama-cpp", "--max-num-seqs", "2", "--max-model-len", "1024"]) as server:
        child = _llama_server_child(server.proc.pid)
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(server.base_url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = httpx.get(server.base_url + "/health")
        assert health.status_code == 503
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=4)
        assert e.value.status_code == 503 and "llama-server exited" in e.value.body["message"]
        assert server.proc.poll() is None  # our server stays up and says why


def test_llama_server_dies_with_a_killed_server():
    """SIGKILL on llm-serve leaves no llama-server behind holding its port and memory."""
    if llama_server.server_binary() is None:
        pytest.skip(llama_server.missing_reason())
    with start_server(["--engine", "llama-cpp", "--max-num-seqs", "1", "--max-model-len", "256"]) as server:
        child = _llama_server_child(server.proc.pid)
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), f"llama-server {child} outlived its llm-serve"


def _running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie waits only to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _llama_server_child(pid: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == pid and comm == "llama-server":
            return int(entry)
    raise AssertionError(f"no llama-server child of {pid}")
