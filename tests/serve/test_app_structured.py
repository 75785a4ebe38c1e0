"""Structured outputs and tools through the app (TestClient, scripted engine): what reaches the engine,
how a scripted reply becomes `tool_calls` (whole and streamed), and the 400s with their `param`."""

from __future__ import annotations

import json

import pytest

from tests.serve.fakes import FakeEngine
from tests.serve.test_app import MSG, make_client, sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_REPLY = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


@pytest.fixture
def engine(real_tokenizer_dir):
    fake = FakeEngine(real_tokenizer_dir)
    fake.max_model_len = 2048  # room for tool descriptions in the prompt
    return fake


@pytest.fixture
def tool_engine(real_tokenizer_dir):
    fake = FakeEngine(real_tokenizer_dir, reply=CALL_REPLY)
    fake.max_model_len = 2048
    return fake


def post(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 60, **body})


def test_a_call_in_the_reply_becomes_tool_calls(tool_engine):
    with make_client(tool_engine) as client:
        r = post(client, tools=[WEATHER])
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me look."
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        # The tools reached the prompt (the default template has none: Hermes text in the system turn).
        prompt = tool_engine.tokenizer.decode(tool_engine.requests[-1].prompt_token_ids)
        assert "<tools>" in prompt and '"get_weather"' in prompt


def test_streamed_call_is_a_tool_calls_delta(tool_engine):
    with make_client(tool_engine) as client:
        r = post(client, tools=[WEATHER], stream=True)
        events = [json.loads(e) for e in sse_events(r.text) if e != "[DONE]"]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    deltas = [d for e in events if e["choices"] for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert content.strip() == "Let me look."
    assert [d["function"]["name"] for d in deltas] == ["get_weather"] and deltas[0]["index"] == 0
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_unoffered_function_stays_text_and_none_is_not_parsed(tool_engine):
    other = json.loads(json.dumps(WEATHER))
    other["function"]["name"] = "get_time"
    with make_client(tool_engine) as client:
        choice = post(client, tools=[other]).json()["choices"][0]
        assert choice["message"]["content"] == CALL_REPLY and choice["message"].get("tool_calls") is None
        assert choice["finish_reason"] == "stop"
        choice = post(client, tools=[WEATHER], tool_choice="none").json()["choices"][0]
        assert choice["message"]["content"] == CALL_REPLY and choice["finish_reason"] == "stop"
        prompt = tool_engine.tokenizer.decode(tool_engine.requests[-1].prompt_token_ids)
        assert "<tools>" not in prompt  # tool_choice=none: the tools are not shown


def test_constraints_reach_the_engine_compiled(engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with make_client(engine) as client:
        rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        assert post(client, response_format=rf).status_code == 200
        request = engine.requests[-1]
        assert request.params.constraint.kind == "json_schema" and request.grammar is not None
        assert post(client, response_format={"type": "text"}).status_code == 200
        assert engine.requests[-1].params.constraint is None and engine.requests[-1].grammar is None
        r = client.post("/v1/completions", json={"prompt": "x", "structured_outputs": {"choice": ["a", "b"]}})
        assert r.status_code == 200 and engine.requests[-1].params.constraint.kind == "choice"
        forced = post(client, tools=[WEATHER], tool_choice="required")
        assert forced.status_code == 200 and engine.requests[-1].params.constraint.kind == "structural_tag"


def test_history_with_calls_and_results_is_rendered(engine):
    history = [
        *MSG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "P"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 21}'},
    ]
    with make_client(engine) as client:
        r = client.post("/v1/chat/completions", json={"messages": history, "tools": [WEATHER]})
        assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(engine.requests[-1].prompt_token_ids)
    assert '<tool_response>\n{"t": 21}\n</tool_response>' in prompt and '"arguments": {"city": "P"}' in prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {"type": "x"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "(", "json": {}}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a"], "bogus": 1}}, "structured_outputs.bogus"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"top_k": 5}, "top_k"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"guided_json": {}}, "guided_json"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_structured_input_is_a_400_naming_the_field(engine, body, param):
    with make_client(engine) as client:
        r = post(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert engine.requests == []


def test_harmless_extras_and_no_op_values_are_accepted(engine):
    with make_client(engine) as client:
        r = post(client, logit_bias={}, top_k=-1, store=False, metadata={"k": "v"}, service_tier="auto")
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"prompt": "x", "tools": [WEATHER]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
