"""No input stops the server: a real `llm-serve --api-key` (default model) against bad inputs, an
API fuzzer and a soak of streamed requests with clients that walk away.

- the bad inputs that gave 500s or dropped connections each get a 400 naming the parameter, and the
  server keeps serving (`/health` 200, a normal request answers);
- tokenizer endpoints need the key; nothing unauthenticated names an adapter;
- schemathesis (fixed seed, bounded examples, every check) finds nothing: no 5xx, no undocumented
  status or content type, no schema-valid request refused, no invalid one accepted, 405 with `Allow`;
- a soak of streamed requests, a third of them abandoned mid-stream: no 5xx, every request counted
  once in /metrics (200 or 499), running sequences back to 0, resident memory flat after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers.adapters import make_lora_adapter
from tests.helpers.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

KEY = "k-robust"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADAPTER = "secret-persona"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    adapter = make_lora_adapter(default_model.path, tmp_path_factory.mktemp("adapter") / ADAPTER, seed=3)
    with start_server(["--model", "default", "--api-key", KEY, "--adapter", f"{ADAPTER}={adapter}"]) as srv:
        yield srv


def _post(server, path: str, body: bytes | dict, headers=AUTH) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            server.base_url + path,
            content=body,
            headers={**headers, "Content-Type": "application/json"},
            timeout=60,
        )
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


LONE = b'"\\ud800"'  # JSON for a lone surrogate: valid JSON, not valid Unicode
CHAT = b'{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}'

BAD_INPUTS = [
    ("/v1/chat/completions", CHAT % LONE, "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % LONE,
     "messages.0.content.0.text"),
    ("/v1/completions", b'{"prompt": %s, "max_tokens": 2}' % LONE, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "stop": [%s], "max_tokens": 2}' % LONE, "stop.0"),
    ("/v1/chat/completions", b'{"model": %s, "messages": [{"role": "user", "content": "hi"}]}' % LONE, "model"),
    ("/tokenize", b'{"prompt": %s}' % LONE, "prompt"),
    ("/v1/chat/completions", CHAT[:-1] % b'"hi"' + b', "seed": 1180591620717411303424}', "seed"),
    ("/v1/chat/completions", CHAT[:-1] % b'"hi"' + b', "seed": -1}', "seed"),
    ("/tokenize", b'{"messages": [{"role": "tool", "content": [{}]}]}', "messages.0.content.0"),
    ("/tokenize", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", CHAT[:-1] % b'"hi"' + b', "n": "2"}', "n"),
    ("/v1/chat/completions", CHAT[:-1] % b'"hi"' + b', "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": [[1, 2], [99999999]], "max_tokens": 2}', "prompt"),
    ("/detokenize", b'{"tokens": [-1]}', "tokens.0"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), BAD_INPUTS)
def test_bad_input_is_a_400_naming_the_parameter(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "/site-packages/" not in r.text


@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 1.0])
@pytest.mark.parametrize("temperature", [1e-5, 2.0])
def test_sampling_is_safe_at_the_edges_and_the_server_keeps_serving(server, top_p, temperature):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "top_p": top_p,
        "temperature": temperature,
        "presence_penalty": 2.0,
        "frequency_penalty": -2.0,
        "seed": 7,
    }
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_after_the_bad_inputs_the_server_still_serves(server):
    for path, body, _ in BAD_INPUTS:
        _post(server, path, body)
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    r = _post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_nothing_unauthenticated_runs_the_tokenizer_or_names_an_adapter(server):
    base = server.base_url
    for method, path, body in [
        ("POST", "/tokenize", {"prompt": "x"}),
        ("POST", "/detokenize", {"tokens": [1]}),
        ("GET", "/tokenizer_info", None),
        ("GET", "/v1/models", None),
        ("POST", "/tokenize", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ]:
        r = httpx.request(method, base + path, json=body)
        assert r.status_code == 401 and ADAPTER not in r.text, (path, r.text)
    _post(server, "/v1/chat/completions", {"model": ADAPTER, "messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": 1})  # fmt: skip
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        r = httpx.get(base + path)
        assert r.status_code == 200 and ADAPTER not in r.text, path
    assert re.search(r'model="adapter-[0-9a-f]{10}"', httpx.get(base + "/metrics").text)
    # With the key, /v1/models names it, and /tokenize works.
    assert ADAPTER in httpx.get(base + "/v1/models", headers=AUTH).text
    assert _post(server, "/tokenize", {"prompt": "x"}).status_code == 200


def test_schemathesis_finds_nothing(server, tmp_path):
    """Every check, positive and negative data, fixed seed (the figures are in the closing note)."""
    report = tmp_path / "schemathesis.json"
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", server.base_url + "/openapi.json",
        "-H", f"Authorization: Bearer {KEY}", "--checks", "all", "--mode", "all",
        "--max-examples", os.environ.get("LLM_SERVE_FUZZ_EXAMPLES", "12"), "--seed", "20261202",
        "--no-shrink", "--workers", "1", "--request-timeout", "120", "--max-response-time", "60",
        "--output-sanitize", "false", "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.serve.schemathesis_hooks", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout[proc.stdout.find("SUMMARY") :] if "SUMMARY" in proc.stdout else proc.stdout[-4000:]
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", summary), summary
    assert httpx.get(server.base_url + "/health").status_code == 200


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _soak(base: str, requests: int, concurrency: int) -> dict:
    """Streamed chats; every third client closes its stream after the first content chunk."""
    statuses: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, client: httpx.AsyncClient) -> None:
        body = {
            "model": ADAPTER if i % 2 else None,
            "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
            "max_tokens": 12,
            "stream": True,
            "temperature": 0.7,
        }
        async with sem, client.stream("POST", "/v1/chat/completions", json=body) as r:
            key = str(r.status_code)
            async for line in r.aiter_lines():
                if i % 3 == 0 and '"content"' in line and '"content": ""' not in line:
                    key = "abandoned"
                    break  # leave: the response is closed mid-stream
                if '"error"' in line:
                    key = "error-chunk"
            statuses[key] = statuses.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=300) as client:
        await asyncio.gather(*(one(i, client) for i in range(requests)))
    return statuses


def test_soak_with_disconnects_keeps_memory_flat_and_counts_every_request(server):
    base = server.base_url
    proc = psutil.Process(server.proc.pid)
    before = httpx.get(base + "/metrics").text
    warm = asyncio.run(_soak(base, 60, 16))
    rss_warm = proc.memory_info().rss
    soak = asyncio.run(_soak(base, 240, 16))
    rss_after = proc.memory_info().rss
    assert set(warm) | set(soak) <= {"200", "abandoned"}, (warm, soak)
    deadline = time.monotonic() + 30
    while True:  # aborted sequences leave at the next engine step
        text = httpx.get(base + "/metrics").text
        if _metric(text, "llm_serve_running_requests") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _metric(text, "llm_serve_running_requests") == 0 and _metric(text, "llm_serve_queue_depth") == 0
    endpoint = "/v1/chat/completions"
    counted = sum(
        _metric(text, "llm_serve_requests_total", endpoint=endpoint, status=s)
        - _metric(before, "llm_serve_requests_total", endpoint=endpoint, status=s)
        for s in ("200", "499")
    )
    assert counted == 300, counted
    disconnected = _metric(text, "llm_serve_requests_total", endpoint=endpoint, status="499")
    assert disconnected >= 0.8 * (warm.get("abandoned", 0) + soak.get("abandoned", 0))
    assert _metric(text, "llm_serve_requests_total", status="500") == 0
    growth_mb = (rss_after - rss_warm) / 2**20
    print(f"soak: {soak}, warm-up {warm}; RSS {rss_warm / 2**20:.0f} -> {rss_after / 2**20:.0f} MB")
    assert growth_mb < 100, growth_mb
