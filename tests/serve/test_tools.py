"""Tool calling below the HTTP layer: the syntaxes, reading calls from whole and streamed replies,
rendering OpenAI conversations for templates with and without tool support, and the forcing grammar."""

from __future__ import annotations

import json

import pytest

from serve.artifacts.run_manifest import RunManifest
from serve.tools.formats import FORMATS, Call
from serve.tools.parser import ToolCallParser, parse_reply
from serve.tools.render import ToolsUnsupportedError, render_messages, tool_support

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
OFFERED = {"get_weather"}


def stream(fmt_name: str, text: str, offered=OFFERED, piece: int = 3):
    """Feed `text` in small pieces, as a stream would; return (content shown, final parse)."""
    parser = ToolCallParser(FORMATS[fmt_name], offered)
    parts = [parser.feed(text[i : i + piece]) for i in range(0, len(text), piece)] + [parser.finish()]
    return "".join(p.content for p in parts), [c for p in parts for c in p.calls]


@pytest.mark.parametrize(
    ("fmt", "reply"),
    [
        (
            "hermes",
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        ),
        ("react", 'Let me check.\nAction: get_weather\nAction Input: {"city": "Paris"}'),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ],
)
def test_calls_are_read_from_whole_and_streamed_replies(fmt, reply):
    whole = parse_reply(FORMATS[fmt], OFFERED, reply)
    assert whole.calls == [Call("get_weather", '{"city": "Paris"}')]
    shown, calls = stream(fmt, reply)
    assert calls == whole.calls
    assert shown.strip() == whole.content == ("" if fmt == "llama3" else "Let me check.")


def test_parallel_hermes_calls():
    reply = "\n".join(
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}\n</tool_call>' for c in "AB"
    )
    assert [
        json.loads(c.arguments)["city"] for c in parse_reply(FORMATS["hermes"], OFFERED, reply).calls
    ] == [
        "A",
        "B",
    ]


@pytest.mark.parametrize(
    "reply",
    [
        '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not offered
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',  # broken JSON
        "I would use <tool_call> here",  # cut off
    ],
)
def test_text_that_only_looks_like_a_call_stays_text(reply):
    whole = parse_reply(FORMATS["hermes"], OFFERED, reply)
    assert whole.calls == [] and whole.content == reply
    shown, calls = stream("hermes", reply)
    assert calls == [] and shown == reply


def test_stream_holds_back_a_partial_marker_only():
    parser = ToolCallParser(FORMATS["hermes"], OFFERED)
    assert parser.feed("Sure <tool").content == "Sure "
    assert parser.feed("box>").content == "<toolbox>"


def test_hermes_calls_stream_as_each_closes_and_a_cut_call_stays_text():
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>'
    parser = ToolCallParser(FORMATS["hermes"], OFFERED)
    first = parser.feed(block + "\n")
    assert [c.name for c in first.calls] == ["get_weather"] and first.content == ""
    cut = '<tool_call>\n{"name": "get_weather", "argu'
    assert parser.feed(cut).calls == []
    last = parser.finish()  # max_tokens ended the reply inside the second call
    assert last.calls == [] and last.content == cut


def test_a_valid_call_followed_by_prose_keeps_both():
    block = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    whole = parse_reply(FORMATS["hermes"], OFFERED, block + " and then some prose")
    assert whole.calls == [Call("get_weather", "{}")] and whole.content == "and then some prose"


def test_arguments_given_as_a_json_string_are_accepted():
    reply = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>'
    assert parse_reply(FORMATS["hermes"], OFFERED, reply).calls == [Call("get_weather", '{"city": "Oslo"}')]


# ------------------------------------------------------------------------------- rendering

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


def test_hermes_fallback_writes_tools_into_the_system_message():
    support = tool_support("{{ messages }}")  # a template with no tool support
    assert support.format.name == "hermes" and not support.native
    messages, tools = render_messages(HISTORY, [WEATHER], support)
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("# Tools")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'}


def test_llamafactory_adapter_uses_the_format_and_system_prompt_it_was_trained_with():
    manifest = RunManifest.model_validate(  # what llm-train records (serve.artifacts.run_manifest)
        {
            "base_model": {"name": "default"},
            "template": {"name": "smollm2", "tools": {"format": "default", "default_system": "Be nice."}},
        }
    )
    support = tool_support("{{ messages }}", manifest)
    assert support.format.name == "react"
    messages, _ = render_messages(HISTORY, [WEATHER], support)
    system = messages[0]["content"]
    assert system.startswith("Be nice.You have access to the following tools:\n> Tool Name: get_weather")
    assert "  - city (string, required): \n" in system and "should be one of [c, f]" in system
    assert messages[2]["content"] == 'Action: get_weather\nAction Input: {"city": "Paris"}'
    assert messages[3] == {"role": "user", "content": '{"temp": 21}'}


def test_unsupported_llamafactory_format_is_refused_with_the_reason():
    manifest = RunManifest.model_validate(
        {"base_model": {"name": "default"}, "template": {"tools": {"format": "glm4"}}}
    )
    support = tool_support(None, manifest)
    with pytest.raises(ToolsUnsupportedError, match="glm4"):
        render_messages(HISTORY, [WEATHER], support)


def test_native_template_gets_tools_and_structured_calls():
    template = "{% for t in tools %}{{ t }}{% endfor %}<tool_call>"
    support = tool_support(template)
    assert support.native and support.format.name == "hermes"
    messages, tools = render_messages(HISTORY, [WEATHER], support)
    assert tools == [WEATHER]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2]["name"] == "get_weather" and messages[2]["tool_call_id"] == "call_1"


def test_bad_arguments_in_history_are_a_clear_error():
    bad = [
        dict(HISTORY[1], tool_calls=[{"id": "x", "function": {"name": "get_weather", "arguments": "{oops"}}])
    ]
    with pytest.raises(ValueError, match="get_weather.*not valid JSON"):
        render_messages(bad, [WEATHER], tool_support(None))


# ------------------------------------------------------------------------------- forcing grammar


@pytest.mark.parametrize("fmt", ["hermes", "react", "llama3"])
def test_forced_grammar_accepts_exactly_valid_calls_and_they_parse_back(fmt):
    import xgrammar as xgr

    vocab = [bytes([i]) for i in range(256)] + [b"<eos>"]
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[256]))
    grammar = compiler.compile_structural_tag(json.dumps(FORMATS[fmt].forced_tag([WEATHER], parallel=True)))

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return all(matcher.accept_token(b) for b in text.encode()) and matcher.accept_token(256)

    good = FORMATS[fmt].calls_text([Call("get_weather", '{"city": "Paris", "unit": "c"}')])
    assert accepts(good)
    assert parse_reply(FORMATS[fmt], OFFERED, good).calls
    assert not accepts(FORMATS[fmt].calls_text([Call("get_weather", '{"unit": "c"}')]))  # missing required
    assert not accepts(FORMATS[fmt].calls_text([Call("other", '{"city": "Paris"}')]))
    assert not accepts("Sure, here you go")


def byte_compiler():
    import xgrammar as xgr

    vocab = [bytes([i]) for i in range(256)] + [b"<eos>"]
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[256]))


def accepts(grammar, text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    return all(matcher.accept_token(b) for b in text.encode()) and matcher.accept_token(256)


@pytest.mark.parametrize("fmt", ["hermes", "react"])
def test_strict_auto_lets_text_through_but_holds_a_begun_call_to_the_schema(fmt):
    grammar = byte_compiler().compile_structural_tag(json.dumps(FORMATS[fmt].triggered_tag([WEATHER], True)))
    assert accepts(grammar, "It is sunny, no call needed.")
    call = FORMATS[fmt].calls_text([Call("get_weather", '{"city": "Rome"}')])
    assert accepts(grammar, "Checking.\n" + call)
    assert not accepts(grammar, FORMATS[fmt].calls_text([Call("get_weather", '{"town": "Rome"}')]))


def tools_of(*defs):
    from serve.tools.protocol import Tool

    return [Tool.model_validate(d) for d in defs]


def test_plan_tools_choices():
    from serve.structured.spec import GrammarError
    from serve.tools.choice import plan_tools
    from serve.tools.protocol import NamedToolChoice

    hermes = FORMATS["hermes"]
    assert plan_tools(None, None, None, hermes) is None
    auto = plan_tools(tools_of(WEATHER), None, None, hermes)
    assert auto.parse and auto.constraint is None and auto.offered == {"get_weather"}
    none = plan_tools(tools_of(WEATHER), "none", None, hermes)
    assert none.tools == [] and not none.parse
    required = plan_tools(tools_of(WEATHER), "required", False, hermes)
    assert required.constraint.param == "tool_choice"
    assert json.loads(required.constraint.value)["format"]["stop_after_first"] is True
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(GrammarError) as err:
        plan_tools(tools_of(WEATHER), named, None, hermes)
    assert err.value.param == "tool_choice.function.name"
    with pytest.raises(GrammarError, match="tool_choice needs tools"):
        plan_tools(None, "required", None, hermes)
    strict = json.loads(json.dumps(WEATHER))
    strict["function"]["strict"] = True
    assert plan_tools(tools_of(strict), "auto", None, hermes).constraint.param == "tools"
    strict["function"]["parameters"]["properties"]["tags"] = {"type": "array", "uniqueItems": True}
    with pytest.raises(GrammarError) as err:
        plan_tools(tools_of(strict), "auto", None, hermes)
    assert err.value.param == "tools.0.function.parameters" and "uniqueItems" in str(err.value)
