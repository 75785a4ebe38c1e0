"""The app under a real uvicorn (in a thread, scripted engine): what only a real HTTP server shows.

Keep-alive connections survive a 500, a chunked body over the limit is a 413, undeclared methods
are 405 with `Allow`, and tokenizing megabytes of text does not stall other requests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from serve.adapters import AdapterSpec
from serve.config import ServeConfig
from serve.http.app import build_app
from serve.served import ServedModels
from tests.helpers.server import free_port
from tests.serve.fakes import FakeEngine

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_model):
    engine = FakeEngine(default_model.path)
    spec = AdapterSpec(
        name="a", path=Path("/nonexistent/a"), base_model="default", rank=8, alpha=16, target_modules=[]
    )
    config = ServeConfig(api_key="k")  # 4 MiB body limit
    app = build_app(engine, config, lambda eng: ServedModels("base", "/models/base", [spec], eng.tokenizer))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield base, engine
    srv.should_exit = True
    thread.join(10)


def test_keep_alive_connection_survives_a_500(server):
    base, engine = server

    async def crash(request):
        raise RuntimeError("an engine bug")
        yield  # pragma: no cover

    real = engine.generate
    engine.generate = crash
    try:
        with httpx.Client(base_url=base, headers={"Authorization": "Bearer k"}) as client:
            for _ in range(5):
                r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
                assert "an engine bug" not in r.text  # no internals to the client
                assert r.headers.get("connection") != "close"
                # The same connection answers the next request.
                assert client.get("/health").status_code == 200
    finally:
        engine.generate = real


def test_chunked_body_over_the_limit_is_413(server):
    base, _ = server

    def chunks():
        for _ in range(5 * 1024):
            yield b" " * 1024  # 5 MiB of whitespace, no Content-Length

    r = httpx.post(
        base + "/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    small = httpx.post(
        base + "/v1/chat/completions",
        content=iter([b'{"messages": [{"role": "user", ', b'"content": "hi"}], "max_tokens": 2}']),
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
    )
    assert small.status_code == 200, small.text


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("TRACE", "/health", "GET"), ("DELETE", "/v1/models", "GET"), ("GET", "/v1/chat/completions", "POST")],
)
def test_undeclared_methods_are_405_with_allow(server, method, path, allow):
    base, _ = server
    r = httpx.request(method, base + path, headers={"Authorization": "Bearer k"})
    assert r.status_code == 405 and allow in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_tokenizing_megabytes_does_not_stall_other_requests(server):
    base, _ = server
    text = "The quick brown fox jumps over the lazy dog. " * 45_000  # ~2 MB: seconds of tokenizing
    done = threading.Event()
    latencies: list[float] = []

    def probe():
        while not done.is_set():
            t0 = time.monotonic()
            httpx.get(base + "/health", timeout=10)
            latencies.append(time.monotonic() - t0)
            time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        r = httpx.post(
            base + "/tokenize", json={"prompt": text}, headers={"Authorization": "Bearer k"}, timeout=120
        )
        assert r.status_code == 200 and r.json()["count"] > 400_000
    finally:
        done.set()
        prober.join()
    assert latencies and max(latencies) < 1.0, max(latencies)
