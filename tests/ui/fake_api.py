"""A tiny OpenAI-compatible server for the UI's fast tests (no model): run in a thread on a free port.

Models: `base` and its adapter `adapter-a` echo the last user message word by word as
`[MODEL] echo: TEXT`; `midstream` sends two words then an error chunk; `slow` streams 200 words
slowly (for Stop); a request with `tools` gets "Checking." and a call to the first tool. Any other
model is a 404, `busy` a 429, and a wrong key a 401 (OpenAI's shapes).
Every chat request body is kept in `.requests`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODELS = [
    {"id": "base", "object": "model", "owned_by": "fake", "parent": None},
    {"id": "adapter-a", "object": "model", "owned_by": "fake", "parent": "base"},
    {"id": "midstream", "object": "model", "owned_by": "fake", "parent": "base"},
    {"id": "slow", "object": "model", "owned_by": "fake", "parent": "base"},
]


def _error(status: int, message: str, type_: str, code: str | None, param: str | None = None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _chunk(model: str, content: str | None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


def _delta(model: str, delta: dict) -> str:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return f"data: {json.dumps(body)}\n\n"


def build_app(api_key: str | None = None, delay: float = 0.0):
    app = FastAPI()
    app.state.requests = []
    app.state.cancelled = []

    def unauthorized(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "Incorrect API key provided.", "authentication_error", "invalid_api_key")
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return unauthorized(request) or {"object": "list", "data": MODELS}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if denied := unauthorized(request):
            return denied
        body = await request.json()
        app.state.requests.append(body)
        model = body.get("model")
        if model == "busy":
            return _error(429, "Too many requests waiting; retry later.", "rate_limit_error", "queue_full")
        if model not in {m["id"] for m in MODELS}:
            return _error(
                404,
                f"The model '{model}' does not exist.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        words = f"[{model}] echo: {user}".split(" ")
        if model == "slow":
            words = [f"w{i}" for i in range(200)]

        if body.get("tools"):
            name = body["tools"][0]["function"]["name"]

            async def calls():
                yield _chunk(model, "Checking.")
                call = {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                yield _delta(model, {"tool_calls": [call]})
                for part in ('{"city": ', '"Paris"}'):
                    yield _delta(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                yield _chunk(model, None, "tool_calls")
                yield "data: [DONE]\n\n"

            return StreamingResponse(calls(), media_type="text/event-stream")

        async def events():
            try:
                for i, word in enumerate(words):
                    if model == "midstream" and i == 2:
                        yield 'data: {"error": {"message": "engine failed", "type": "server_error"}}\n\n'
                        break
                    yield _chunk(model, word if i == 0 else " " + word)
                    await asyncio.sleep(0.05 if model == "slow" else delay)
                else:
                    yield _chunk(model, None, "stop")
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                app.state.cancelled.append(model)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class FakeServer:
    def __init__(self, app, server, thread, port: int):
        self.app, self._server, self._thread, self.port = app, server, thread, port
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def requests(self) -> list[dict]:
        return self.app.state.requests


@contextmanager
def run_fake_api(api_key: str | None = None, delay: float = 0.0):
    """Serve `build_app(...)` with uvicorn in a background thread until the block ends."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(api_key, delay), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake API did not start")
        time.sleep(0.02)
    try:
        yield FakeServer(server.config.app, server, thread, port)
    finally:
        server.should_exit = True
        thread.join(10)
