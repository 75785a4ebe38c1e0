"""The HTTP app through TestClient with a scripted engine: shapes, errors, auth, limits, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.adapters import AdapterSpec
from serve.config import ServeConfig
from serve.http.app import build_app
from serve.served import ServedModels
from tests.serve.fakes import FakeEngine

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def engine(real_tokenizer_dir):
    return FakeEngine(real_tokenizer_dir)


def make_client(engine, **cfg) -> TestClient:
    spec = AdapterSpec(
        name="a", path=Path("/nonexistent/a"), base_model="default", rank=8, alpha=16, target_modules=[]
    )
    app = build_app(
        engine, ServeConfig(**cfg), lambda eng: ServedModels("base", "/models/base", [spec], eng.tokenizer)
    )
    return TestClient(app)


@pytest.fixture
def client(engine):
    with make_client(engine) as c:
        yield c


def sse_events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_models_lists_base_and_adapters(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("base", None), ("a", "base")]


def test_chat_reply_usage_and_template(client, engine):
    r = client.post("/v1/chat/completions", json={"model": "a", "messages": MSG, "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["model"] == "a"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == engine.tokenizer.decode(engine.reply_ids[:3])
    req = engine.requests[-1]
    assert req.adapter == "a" and req.params.max_tokens == 3
    assert (
        body["usage"]["prompt_tokens"] == len(req.prompt_token_ids)
        and body["usage"]["completion_tokens"] == 3
    )
    # The chat template was applied: the prompt ends with the assistant header.
    assert engine.tokenizer.decode(req.prompt_token_ids).endswith("<|im_start|>assistant\n")
    # Stop on the template's end-of-turn token.
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in req.params.stop_token_ids


def test_max_tokens_clamped_and_context_overflow(client, engine):
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1000})
    assert r.status_code == 200
    assert engine.requests[-1].params.max_tokens == engine.max_model_len - len(
        engine.requests[-1].prompt_token_ids
    )
    long = [{"role": "user", "content": "word " * 200}]
    r = client.post("/v1/chat/completions", json={"messages": long})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages" and err["code"] == "context_length_exceeded"
    assert "64 tokens" in err["message"]


def test_stream_with_usage(client, engine):
    body = {"messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/v1/chat/completions", json=body)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == engine.tokenizer.decode(engine.reply_ids)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(engine.reply_ids)


def test_stream_failure_sends_error_chunk_then_done(client, engine):
    engine.fail_after = 2
    r = client.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "Traceback" not in r.text


def test_n_choices_with_seed(client, engine):
    r = client.post("/v1/chat/completions", json={"messages": MSG, "n": 3, "seed": 5, "max_tokens": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert sorted(q.params.seed for q in engine.requests[-3:]) == [5, 6, 7]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": MSG, "temperature": 3}, "temperature"),
        ({"messages": "hello"}, "messages"),
        ({"messages": MSG, "n": 0}, "n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_validation_errors_are_400_with_param(client, payload, param):
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_invalid_json_and_unknown_model_and_route(client):
    r = client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "zzz", "messages": MSG})
    assert (
        r.status_code == 404
        and r.json()["error"]["code"] == "model_not_found"
        and "base, a" in r.json()["error"]["message"]
    )
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_auth(engine):
    with make_client(engine, api_key="sekret") as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes stay open


def test_body_limit_and_overload(engine):
    with make_client(engine, max_body_bytes=2048) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        engine.overloaded = True
        r = c.post("/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_completions_echo_logprobs_shape(client, engine):
    from serve.engine.types import GenerationOutput, TokenLogprob

    async def scored(request):
        ids = request.prompt_token_ids
        plp = [None] + [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids[1:]]
        yield GenerationOutput(
            request.request_id, token_ids=[5], text="x", logprobs=[TokenLogprob(5, -0.5, [(5, -0.5)])],
            prompt_logprobs=plp, finish_reason="length", num_prompt_tokens=len(ids), num_generated_tokens=1,
        )  # fmt: skip

    engine.generate = scored
    r = client.post(
        "/v1/completions", json={"prompt": [[1, 2, 3]], "max_tokens": 1, "echo": True, "logprobs": 1}
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [None, -1.0, -1.0, -0.5]
    assert lp["top_logprobs"][0] is None and len(lp["tokens"]) == 4
    assert list(lp["top_logprobs"][3].values()) == [-0.5]


def test_tokenize_detokenize_info(client, engine):
    r = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == engine.tokenizer.encode("Hello world", add_special_tokens=False) and r[
        "count"
    ] == len(r["tokens"])
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    client.post("/v1/chat/completions", json={"model": "a", "messages": MSG, "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'llm_serve_requests_total{endpoint="/v1/chat/completions",model="a",status="200"} 1.0' in text
    assert 'llm_serve_generation_tokens_total{model="a"} 2.0' in text
    assert "llm_serve_queue_depth" in text


def test_dead_engine_is_503_everywhere_with_the_reason(client, engine):
    engine.dead = "engine failure: RuntimeError: boom"
    health = client.get("/health")
    assert health.status_code == 503 and "boom" in health.json()["detail"]
    assert client.get("/ready").status_code == 503
    r = client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert "loading" not in r.json()["error"]["message"]


def test_models_is_503_with_retry_after_until_ready(engine):
    engine.start = lambda: __import__("asyncio").sleep(3600)  # never finishes loading
    with make_client(engine) as c:
        r = c.get("/v1/models")
        assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 503


def test_tokenizer_endpoints_and_metrics_with_a_key(engine):
    with make_client(engine, api_key="sekret") as c:
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 401
        assert c.get("/tokenizer_info").status_code == 401
        key = {"Authorization": "Bearer sekret"}
        c.post("/v1/chat/completions", json={"model": "a", "messages": MSG, "max_tokens": 2}, headers=key)
        text = c.get("/metrics").text  # open, as Prometheus expects, but adapters go by hash
        assert 'model="a"' not in text and 'model="adapter-' in text
    with make_client(engine, api_key="sekret", metrics_need_key=True) as c:
        assert c.get("/metrics").status_code == 401
        c.post("/v1/chat/completions", json={"model": "a", "messages": MSG, "max_tokens": 2}, headers=key)
        assert 'model="a"' in c.get("/metrics", headers=key).text


def test_openapi_tells_the_truth(engine):
    with make_client(engine, api_key="sekret") as c:
        doc = c.get("/openapi.json").json()
    text = str(doc)
    assert "'422'" not in text and "HTTPValidationError" not in text
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(chat["responses"])
    assert chat["security"] == [{"bearer": []}]
    assert "401" not in doc["paths"]["/health"]["get"]["responses"]
    assert "security" not in doc["paths"]["/metrics"]["get"]
    ids = doc["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert ids["maximum"] == len(engine.tokenizer) - 1


def test_add_generation_prompt_is_honoured(client):
    with_prompt = client.post("/tokenize", json={"messages": MSG}).json()["tokens"]
    without = client.post("/tokenize", json={"messages": MSG, "add_generation_prompt": False}).json()[
        "tokens"
    ]
    assert len(with_prompt) > len(without) and with_prompt[: len(without)] == without
