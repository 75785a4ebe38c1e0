"""Structured outputs below the HTTP layer: constraints, the strict-schema check, xgrammar compiling and
caching with the real default tokenizer, and the per-row bitmask on a batch of logits."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from serve.structured.bitmask import GrammarState, apply_bitmask, fill_bitmask
from serve.structured.compiler import GrammarCompiler, native_reason
from serve.structured.schema_check import unenforced_keywords
from serve.structured.spec import GrammarError, OutputConstraint

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    c = GrammarCompiler(tokenizer, 49152)
    c.warm()
    return c


def walk(compiled, tokenizer, text: str, eos: int) -> tuple[bool, bool]:
    """(every token of `text` accepted, the grammar then accepts `eos` and ends)."""
    state = GrammarState.start(compiled, [eos])
    ok = all(state.accept(t) for t in tokenizer.encode(text))
    return ok, ok and state.accept(eos) and state.finished


# ------------------------------------------------------------------------------- strict check


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
        ({"type": "string", "format": "credit-card"}, "credit-card"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),
        ({"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}, "#/properties/x"),
    ],
)
def test_strict_check_names_unenforced_keywords(schema, keyword):
    problems = unenforced_keywords(schema)
    assert problems and any(keyword in p for p in problems), problems


def test_strict_check_accepts_what_the_grammar_enforces():
    schema = {
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}},
        "type": "object",
        "title": "Order",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1},
            "email": {"type": "string", "format": "email", "description": "who"},
            # A property *named* like a keyword is a name, not a keyword.
            "not": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["items"],
        "additionalProperties": False,
    }
    assert unenforced_keywords(schema) == []


# ------------------------------------------------------------------------------- compiling


def test_compile_errors_name_the_field_and_the_compilers_reason(compiler):
    cases = [
        (OutputConstraint.regex("[a-", "structured_outputs.regex"), "Unclosed"),
        (OutputConstraint.json_schema({"type": "foo"}, "response_format.json_schema.schema"), "foo"),
        (OutputConstraint.grammar("root ::= missing", "structured_outputs.grammar"), "missing"),
    ]
    for constraint, reason in cases:
        with pytest.raises(GrammarError) as err:
            compiler.compile(constraint)
        assert err.value.param == constraint.param
        assert reason in str(err.value)
        assert ".cc:" not in str(err.value) and "/project/" not in str(err.value)


def test_native_reason_strips_timestamp_and_source_path():
    exc = RuntimeError("[03:05:02] /project/cpp/regex_converter.cc:94: Regex parsing error at position 4\n")
    assert native_reason(exc) == "Regex parsing error at position 4"


def test_compile_once_then_cached(compiler):
    constraint = OutputConstraint.json_schema({**SCHEMA, "title": "cache-test"}, "p")
    before = compiler.stats.compiled
    first = asyncio.run(compiler.compile_async(constraint))
    again = asyncio.run(
        compiler.compile_async(OutputConstraint.json_schema({**SCHEMA, "title": "cache-test"}, "q"))
    )
    assert again is first
    assert compiler.stats.compiled == before + 1 and compiler.stats.cache_hits >= 1


def test_grammars_accept_valid_and_refuse_invalid_text(compiler, tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    schema = compiler.compile(OutputConstraint.json_schema(SCHEMA, "p"))
    assert walk(schema, tokenizer, '{"name": "Ada", "age": 36}', eos) == (True, True)
    assert walk(schema, tokenizer, '{"name": "Ada", "age": -1}', eos)[0] is False
    assert walk(schema, tokenizer, '{"name": "Ada"}', eos)[0] is False
    obj = compiler.compile(OutputConstraint.json_object("response_format"))
    assert walk(obj, tokenizer, '{"anything": [1, {"x": null}]}', eos) == (True, True)
    assert walk(obj, tokenizer, "[1, 2]", eos)[0] is False
    choice = compiler.compile(OutputConstraint.choice(["yes", 'no "way"'], "p"))
    assert walk(choice, tokenizer, 'no "way"', eos) == (True, True)
    assert walk(choice, tokenizer, "maybe", eos)[0] is False
    regex = compiler.compile(OutputConstraint.regex(r"\d{3}-\d{4}", "p"))
    assert walk(regex, tokenizer, "555-1234", eos) == (True, True)
    assert walk(regex, tokenizer, "555-12345", eos)[1] is False
    lark = compiler.compile(OutputConstraint.grammar('start: "a" "b"+', "p"))
    assert walk(lark, tokenizer, "abbb", eos) == (True, True)


def test_a_json_schema_that_is_not_an_object_is_refused():
    with pytest.raises(GrammarError, match="JSON object"):
        OutputConstraint.json_schema([1, 2], "response_format.json_schema.schema")


# ------------------------------------------------------------------------------- bitmask


def test_bitmask_masks_only_constrained_rows(compiler, tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    compiled = compiler.compile(OutputConstraint.json_schema(SCHEMA, "p"))
    states = [GrammarState.start(compiled, [eos]), None, GrammarState.start(compiled, [eos]), None]
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0))
    masked = logits.clone()
    bitmask, rows = fill_bitmask(states, 49152)
    assert rows == [0, 2]
    apply_bitmask(masked, bitmask, rows)
    assert torch.equal(masked[1], logits[1]) and torch.equal(masked[3], logits[3])
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)
    # Decoding random logits under the mask produces schema-valid JSON and then the stop token.
    bounded = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
    }
    state, out = GrammarState.start(compiler.compile(OutputConstraint.json_schema(bounded, "p")), [eos]), []
    for _ in range(200):
        step = torch.zeros(1, 49152)
        bitmask, rows = fill_bitmask([state], 49152)
        if not rows:
            break
        apply_bitmask(step, bitmask, rows)
        token = int(
            torch.argmax(step + torch.randn(1, 49152, generator=torch.Generator().manual_seed(len(out))))
        )
        assert state.accept(token)
        out.append(token)
        if state.finished:
            break
    assert state.finished and out[-1] == eos
    value = json.loads(tokenizer.decode(out[:-1]))
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9


def test_wider_logits_than_the_grammar_vocabulary_are_masked_past_it(compiler, tokenizer):
    compiled = compiler.compile(OutputConstraint.choice(["a"], "p"))
    logits = torch.zeros(1, 49152 + 64)
    bitmask, rows = fill_bitmask([GrammarState.start(compiled, [2])], 49152)
    apply_bitmask(logits, bitmask, rows)
    assert torch.isinf(logits[0, 49152:]).all()
