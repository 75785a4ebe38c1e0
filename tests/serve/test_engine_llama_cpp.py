"""The llama.cpp engine's pure parts: the /completion body, logprobs, stop rules, settings, missing build.

The real llama-server behind `llm-serve --engine llama-cpp` is tested in test_llama_cpp_e2e.py."""

from __future__ import annotations

import json

import pytest

from serve.config import ServeConfig
from serve.engine.detokenizer import IncrementalDetokenizer
from serve.engine.llama_cpp import _Tracker, completion_body, gguf_type, parse_logprobs
from serve.engine.types import GenerationRequest, InvalidGenerationRequest, SamplingParams
from serve.structured.spec import OutputConstraint


def test_body_switches_off_llama_cpp_sampler_defaults_and_maps_fields():
    p = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, seed=2**40 + 5, presence_penalty=0.5,
                       frequency_penalty=-0.25)  # fmt: skip
    body = completion_body([1, 2, 3], p, lora_id=None)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 7
    assert body["stream"] and body["return_tokens"]
    # A seeded request recomputes its prompt: a cached prefix's logits are a rounding apart.
    assert body["cache_prompt"] is False and completion_body([1], SamplingParams(), None)["cache_prompt"]
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9
    # What an OpenAI client does not ask for must not shape the output: top_k 40, min_p 0.05, repeat penalty.
    assert (
        body["top_k"] == 0
        and body["min_p"] == 0.0
        and body["repeat_penalty"] == 1.0
        and body["typical_p"] == 1.0
    )
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.25
    assert body["seed"] == 5  # llama.cpp seeds are 32-bit
    assert body["lora"] == [] and not body["ignore_eos"]
    assert "n_probs" not in body and "json_schema" not in body


def test_body_greedy_adapter_logprobs_and_no_prefix_cache():
    p = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, ignore_eos=True)
    body = completion_body([9], p, lora_id=2, n_loras=3, cache_prompt=False)
    assert body["temperature"] == 0.0 and body["top_k"] == 1
    # Every adapter's scale is sent: llama-server applies a left-out one at its start-up scale (1).
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 1.0}]
    base = completion_body([9], p, lora_id=None, n_loras=2)["lora"]
    assert base == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    # logprobs=0 still needs the chosen token's logprob: n_probs 0 would report nothing.
    assert body["n_probs"] == 1 and body["post_sampling_probs"] is False
    assert body["ignore_eos"] and body["cache_prompt"] is False
    assert completion_body([9], SamplingParams(logprobs=5), None)["n_probs"] == 5


def test_body_json_constraints_go_to_llama_cpp_others_are_refused_naming_the_field():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    c = OutputConstraint.json_schema(schema, "response_format.json_schema.schema")
    body = completion_body([1], SamplingParams(constraint=c), None)
    assert body["json_schema"] == schema and list(body["json_schema"]["properties"]) == ["b", "a"]
    obj = completion_body(
        [1], SamplingParams(constraint=OutputConstraint.json_object("response_format")), None
    )
    assert obj["json_schema"] == {"type": "object"}
    for c in (
        OutputConstraint.regex("(yes|no)", "structured_outputs.regex"),
        OutputConstraint.choice(["a", "b"], "structured_outputs.choice"),
        OutputConstraint.grammar("root ::= 'x'", "structured_outputs.grammar"),
    ):
        with pytest.raises(InvalidGenerationRequest) as err:
            completion_body([1], SamplingParams(constraint=c), None)
        assert err.value.param == c.param and "--engine hf" in str(err.value)


def test_body_refuses_prompt_logprobs():
    with pytest.raises(InvalidGenerationRequest) as err:
        completion_body([1], SamplingParams(prompt_logprobs=1), None)
    assert err.value.param == "echo" and "--engine hf" in str(err.value)


def test_parse_logprobs_keeps_ids_and_the_asked_number_of_alternatives():
    entry = json.loads(
        '{"id": 5, "token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": ['
        '{"id": 5, "token": "a", "logprob": -0.5}, {"id": 7, "token": "b", "logprob": -1.5}]}'
    )
    lp = parse_logprobs(entry, 1)
    assert (lp.token_id, lp.logprob, lp.top) == (5, -0.5, [(5, -0.5)])
    assert parse_logprobs(entry, 0).top == []


class _CharTokenizer:
    """Token i is chr(i): enough for the detokenizer."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


def _tracker(params: SamplingParams, prompt_len: int = 3, max_model_len: int = 100) -> _Tracker:
    request = GenerationRequest("r", list(range(prompt_len)), params)
    return _Tracker(request, IncrementalDetokenizer(_CharTokenizer(), params.stop), max_model_len)


def test_tracker_stops_on_stop_token_ids_unless_ignore_eos():
    t = _tracker(SamplingParams(max_tokens=10, stop_token_ids=[2]))
    assert t.add(ord("a"), None).text == "a" and t.finish is None
    out = t.add(2, None)
    assert (
        out.finish_reason == "stop"
        and out.text == ""
        and out.token_ids == [2]
        and out.num_generated_tokens == 2
    )
    t = _tracker(SamplingParams(max_tokens=10, stop_token_ids=[2], ignore_eos=True))
    assert t.add(2, None).finish_reason is None


def test_tracker_stop_strings_length_and_context_limits():
    t = _tracker(SamplingParams(max_tokens=10, stop=["xy"]))
    texts = [t.add(ord(c), None) for c in "abxyz"[:4]]
    assert "".join(o.text for o in texts) == "ab" and texts[-1].finish_reason == "stop"
    t = _tracker(SamplingParams(max_tokens=2, stop=["zz"]))
    outs = [t.add(ord("a"), None), t.add(ord("z"), None)]
    # The held-back "z" (maybe the start of "zz") is released when the length limit ends the request.
    assert outs[-1].finish_reason == "length" and "".join(o.text for o in outs) == "az"
    t = _tracker(SamplingParams(max_tokens=50), prompt_len=8, max_model_len=10)
    assert t.add(ord("a"), None).finish_reason is None and t.add(ord("b"), None).finish_reason == "length"


def test_tracker_end_when_llama_server_stops_first():
    t = _tracker(SamplingParams(max_tokens=10, stop=["q"]))
    t.add(ord("a"), None)
    out = t.end("stop")
    assert out.finish_reason == "stop" and out.token_ids == [] and out.num_generated_tokens == 1
    assert _tracker(SamplingParams()).end("error", "boom").error == "boom"


def test_gguf_type_follows_quantize_and_dtype():
    assert gguf_type(ServeConfig(engine="llama-cpp")) == "f32"
    assert gguf_type(ServeConfig(engine="llama-cpp", quantize="int8")) == "q8_0"
    assert gguf_type(ServeConfig(engine="llama-cpp", dtype="bfloat16")) == "bf16"
    with pytest.raises(ValueError, match="vLLM quantizes its own way"):
        ServeConfig(engine="vllm", quantize="int8")


def test_engine_without_a_build_says_how_to_get_one(monkeypatch, tmp_path):
    from serve.engine.llama_cpp import LlamaCppEngine, LlamaCppEngineError
    from serve.models.registry import ResolvedModel

    monkeypatch.setenv("LLM_SERVE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    model = ResolvedModel("x", tmp_path, "x")
    with pytest.raises(LlamaCppEngineError, match="make llama-cpp"):
        LlamaCppEngine(ServeConfig(engine="llama-cpp"), model, [])


@pytest.fixture
def fake_llama_server(monkeypatch, tmp_path):
    """$LLAMA_SERVER pointing at an executable that is never run (the checks come first)."""
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_SERVER", str(fake))
    return fake


def test_engine_refuses_an_architecture_llm_export_cannot_write(fake_llama_server, tmp_path):
    from serve.engine.llama_cpp import LlamaCppEngine, LlamaCppEngineError
    from serve.models.registry import ResolvedModel

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LlamaCppEngineError, match="GPT2LMHeadModel.*--engine hf"):
        LlamaCppEngine(ServeConfig(engine="llama-cpp"), ResolvedModel("x", tmp_path, "x"), [])


def test_llama_cpp_args_only_with_that_engine():
    assert ServeConfig(engine="llama-cpp", llama_cpp_args=["--poll", "0"]).llama_cpp_args == ["--poll", "0"]
    with pytest.raises(ValueError, match="--engine llama-cpp"):
        ServeConfig(llama_cpp_args=["--poll", "0"])


def test_llama_cpp_engine_refuses_runtime_adapters_at_start_up():
    with pytest.raises(ValueError, match="only the adapters given with --adapter"):
        ServeConfig(engine="llama-cpp", adapter_dirs=["saves"])


def test_an_adapter_llama_cpp_cannot_take_stops_start_up(fake_llama_server, tmp_path):
    from serve.adapters import AdapterSpec
    from serve.engine.llama_cpp import LlamaCppEngine
    from serve.models.registry import ResolvedModel
    from train.export.gguf_lora import GgufLoraError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    adapter = tmp_path / "a"
    adapter.mkdir()  # no adapter_config.json / weights
    spec = AdapterSpec("a", adapter, "x", 8, 16.0, ["q_proj"])
    with pytest.raises(GgufLoraError, match=str(adapter)):
        LlamaCppEngine(ServeConfig(engine="llama-cpp"), ResolvedModel("x", tmp_path, "x"), [spec])


def _sse(*events) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def _stream(params: SamplingParams, status: int, content: bytes, prompt_len: int = 3) -> list:
    """Run stream_completion against an in-memory llama-server answering `status` with `content`."""
    import asyncio

    import httpx

    from serve.engine.llama_cpp import stream_completion

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, content=content)

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            tracker = _tracker(params, prompt_len)
            body = completion_body(tracker.request.prompt_token_ids, params, None)
            return [out async for out in stream_completion(client, body, tracker)]

    outs = asyncio.run(run())
    assert seen[0]["prompt"] == list(range(prompt_len))
    return outs


def test_stream_turns_token_chunks_into_outputs_and_skips_null_events():
    content = _sse(
        {"tokens": [ord("h")], "stop": False},
        None,  # llama-server sends `data: null` between some events
        {"tokens": [ord("i")], "stop": False},
        {"tokens": [], "stop": True, "stop_type": "eos"},
    )
    outs = _stream(SamplingParams(max_tokens=10), 200, content)
    assert [o.token_ids for o in outs] == [[ord("h")], [ord("i")], []]
    assert "".join(o.text for o in outs) == "hi" and outs[-1].finish_reason == "stop"
    assert outs[-1].num_generated_tokens == 2


def test_stream_finishes_on_our_limits_without_waiting_for_llama_server():
    tokens = [{"tokens": [ord(c)], "stop": False} for c in "abcdef"]
    outs = _stream(SamplingParams(max_tokens=3), 200, _sse(*tokens))
    assert len(outs) == 3 and outs[-1].finish_reason == "length" and "".join(o.text for o in outs) == "abc"
    outs = _stream(SamplingParams(max_tokens=10, stop=["cd"]), 200, _sse(*tokens))
    assert outs[-1].finish_reason == "stop" and "".join(o.text for o in outs) == "ab"
    # llama-server's own limit (n_predict) is "length" too.
    outs = _stream(
        SamplingParams(max_tokens=10),
        200,
        _sse(tokens[0], {"tokens": [], "stop": True, "stop_type": "limit"}),
    )
    assert outs[-1].finish_reason == "length"


def test_stream_logprobs_errors_and_a_cut_stream():
    lp = {
        "id": 104,
        "token": "h",
        "logprob": -0.1,
        "top_logprobs": [{"id": 104, "logprob": -0.1}, {"id": 1, "logprob": -3.0}],
    }
    content = _sse(
        {"tokens": [104], "completion_probabilities": [lp], "stop": False}, {"error": {"message": "boom"}}
    )
    outs = _stream(SamplingParams(max_tokens=10, logprobs=1), 200, content)
    assert outs[0].logprobs[0].top == [(104, -0.1)]
    assert outs[-1].finish_reason == "error" and outs[-1].error == "boom"
    outs = _stream(SamplingParams(max_tokens=10), 200, _sse({"tokens": [104], "stop": False}))
    assert outs[-1].finish_reason == "abort"  # the stream ended without a stop event


def test_stream_refusals_become_the_errors_the_http_layer_maps():
    from serve.engine.types import EngineOverloadedError

    schema = OutputConstraint.json_schema({"type": "object"}, "response_format.json_schema.schema")
    body = json.dumps({"error": {"message": "failed to parse grammar"}}).encode()
    with pytest.raises(InvalidGenerationRequest) as err:
        _stream(SamplingParams(constraint=schema), 400, body)
    assert err.value.param == "response_format.json_schema.schema" and "failed to parse grammar" in str(
        err.value
    )
    with pytest.raises(EngineOverloadedError):
        _stream(SamplingParams(), 503, b'{"error": {"message": "loading"}}')
    with pytest.raises(RuntimeError, match="answered 500"):
        _stream(SamplingParams(), 500, b"oops")
