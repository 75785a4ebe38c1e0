"""End to end: structured outputs and tool calling through a real `llm-serve` and the official `openai`
client: `parse()` with a pydantic model, JSON mode, vLLM's `structured_outputs`, streamed forced tool
calls, every bad-input 400, and a tool-calling adapter trained with `llm-train` answering `tools=`.

One llm-train run (a few steps on LLaMA-Factory's glaive demo rows) and one server for the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml
from pydantic import BaseModel

from tests.helpers.server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
BASE = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.fixture(scope="module")
def toolcall_adapter(tmp_path_factory, shared_demo_data) -> Path:
    """A LoRA adapter trained by llm-train on glaive tool-call rows (two steps: the format, not skill)."""
    work = tmp_path_factory.mktemp("toolcall")
    cfg = {
        "model_name_or_path": "default",
        "stage": "sft",
        "finetuning_type": "lora",
        "lora_target": "all",
        "dataset": "glaive_toolcall_en_demo",
        "dataset_dir": str(shared_demo_data),
        "max_samples": 4,
        "cutoff_len": 192,
        "per_device_train_batch_size": 1,
        "max_steps": 2,
        "learning_rate": 5.0e-4,
        "logging_steps": 1,
        "output_dir": str(work / "toolcall"),
    }
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    llm_train = str(Path(sys.executable).parent / "llm-train")
    done = subprocess.run(
        [llm_train, str(work / "cfg.yaml"), "--no-progress"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "toolcall"


@pytest.fixture(scope="module")
def server(toolcall_adapter):
    with start_server(["--adapter", f"toolcall={toolcall_adapter}", "--max-num-seqs", "4"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=600)


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=BASE,
        messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population."}],
        response_format=City,
        temperature=0,
        max_tokens=80,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, City) and choice.message.parsed.name


def test_json_object_mode_returns_json(client):
    completion = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Give a JSON object with keys a and b."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    choice = completion.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens before the object closed: said so, never "stop"
        assert choice.finish_reason == "length"


def test_cut_before_the_json_completes_is_length(client):
    completion = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "c", "schema": City.model_json_schema()},
        },
        temperature=0,
        max_tokens=4,
    )
    assert completion.choices[0].finish_reason == "length"


def test_vllm_structured_outputs_on_chat_and_completions(client):
    choice = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        temperature=0,
        max_tokens=5,
    ).choices[0]
    assert choice.message.content in ("yes", "no") and choice.finish_reason == "stop"
    text = client.completions.create(
        model=BASE,
        prompt="The year the Eiffel Tower opened:",
        extra_body={"structured_outputs": {"regex": r" \d{4}"}},
        temperature=0,
        max_tokens=8,
    ).choices[0]
    assert text.finish_reason == "stop" and len(text.text) == 5 and text.text[1:].isdigit()


def test_streamed_required_tool_call_assembles_into_a_valid_call(client):
    stream = client.chat.completions.create(
        model=BASE,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        stream=True,
        max_tokens=100,
        temperature=0,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    # Parallel calls are allowed, so the small model may go on calling until max_tokens; the calls it
    # completed are streamed either way.
    assert finish in ("tool_calls", "length") and calls
    for call in calls.values():
        assert call["id"].startswith("call_") and call["name"] == "get_weather"
        args = json.loads(call["arguments"])
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")


def test_named_tool_choice_and_the_result_sent_back(client):
    first = client.chat.completions.create(
        model=BASE,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    ).choices[0]
    assert first.finish_reason == "tool_calls" and len(first.message.tool_calls) == 1
    call = first.message.tool_calls[0]
    history = [
        *ASK_WEATHER,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model=BASE, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0
    ).choices[0]
    assert second.message.tool_calls is None and second.message.content


def test_trained_tool_adapter_calls_in_its_own_format_and_reads_the_result(client, toolcall_adapter):
    manifest = json.loads((toolcall_adapter / "run_manifest.json").read_text())
    assert manifest["template"]["tools"]["format"] == "default"  # LLaMA-Factory's Action/Action Input
    first = client.chat.completions.create(
        model="toolcall",
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    ).choices[0]
    assert first.finish_reason == "tool_calls"
    call = first.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"]
    history = [
        *ASK_WEATHER,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model="toolcall", messages=history, tools=[WEATHER], max_tokens=40, temperature=0
    ).choices[0]
    assert second.finish_reason in ("stop", "length", "tool_calls")
    assert second.message.content or second.message.tool_calls


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format.json_schema.schema",
            "foo",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "required",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "strict": True,
                        "schema": {"type": "array", "uniqueItems": True},
                    },
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs.regex", "Unclosed"),
        (
            {"extra_body": {"structured_outputs": {"grammar": "root ::= nothing"}}},
            "structured_outputs.grammar",
            "nothing",
        ),
        ({"logit_bias": {"50": 10}}, "logit_bias", "not supported"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=ASK_WEATHER, max_tokens=5, **kwargs)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == param, body
    assert words in body["message"] and ".cc:" not in body["message"]


def test_tools_on_completions_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=BASE, prompt="hi", max_tokens=5, extra_body={"tools": [WEATHER]})
    assert err.value.body["param"] == "tools"
