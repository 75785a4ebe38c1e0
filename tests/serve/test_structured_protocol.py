"""From request fields to one output constraint: response_format, vLLM's structured_outputs, errors."""

from __future__ import annotations

import pytest

from serve.structured.protocol import ResponseFormat, StructuredOutputs, output_constraint
from serve.structured.spec import GrammarError

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def rf(**kw):
    return ResponseFormat.model_validate(kw)


def so(**kw):
    return StructuredOutputs.model_validate(kw)


def error_of(response_format=None, structured=None) -> GrammarError:
    with pytest.raises(GrammarError) as err:
        output_constraint(response_format, structured)
    return err.value


def test_response_formats():
    assert output_constraint(rf(type="text"), None) is None
    assert output_constraint(rf(type="json_object"), None).kind == "json_object"
    c = output_constraint(
        rf(type="json_schema", json_schema={"name": "n", "schema": SCHEMA, "strict": True}), None
    )
    assert (c.kind, c.param, c.schema()) == ("json_schema", "response_format.json_schema.schema", SCHEMA)


def test_property_order_is_kept():
    schema = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}
    c = output_constraint(rf(type="json_schema", json_schema={"name": "n", "schema": schema}), None)
    assert list(c.schema()["properties"]) == ["z", "a"]


@pytest.mark.parametrize(
    ("fmt", "param", "text"),
    [
        ({"type": "json_schema"}, "response_format.json_schema", "needs"),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {"not": {}}}},
            "response_format.json_schema.schema",
            "#/not",
        ),
    ],
)
def test_response_format_errors_name_the_field(fmt, param, text):
    err = error_of(rf(**fmt))
    assert err.param == param and text in str(err)


def test_structured_outputs_kinds():
    assert output_constraint(None, so(json=SCHEMA)).kind == "json_schema"
    assert output_constraint(None, so(json='{"type": "string"}')).schema() == {"type": "string"}
    assert output_constraint(None, so(regex=r"\d+")).value == r"\d+"
    assert output_constraint(None, so(choice=["a", "b"])).choices() == ["a", "b"]
    assert output_constraint(None, so(grammar='root ::= "x"')).kind == "grammar"
    assert output_constraint(None, so(json_object=True)).kind == "json_object"
    assert output_constraint(None, so(json=SCHEMA, disable_any_whitespace=True)).compact


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"json": SCHEMA, "regex": "a"}, "structured_outputs"),
        ({}, "structured_outputs"),
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"structural_tag": "[1]"}, "structured_outputs.structural_tag"),
    ],
)
def test_structured_outputs_errors(fields, param):
    assert error_of(structured=so(**fields)).param == param


@pytest.mark.parametrize(
    ("model", "fields", "loc"),
    [
        (ResponseFormat, {"type": "json_schema", "json_schema": {"schema": SCHEMA}}, ("json_schema", "name")),
        (ResponseFormat, {"type": "json_schema", "json_schema": {"name": "n"}}, ("json_schema", "schema")),
        (
            ResponseFormat,
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            ("json_schema", "name"),
        ),
        (StructuredOutputs, {"choice": []}, ("choice",)),
        (StructuredOutputs, {"regex": ""}, ("regex",)),
        (StructuredOutputs, {"regex": "a", "whitespace_pattern": " "}, ("whitespace_pattern",)),
    ],
)
def test_shape_errors_are_validation_errors_at_the_field(model, fields, loc):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        model.model_validate(fields)
    assert err.value.errors()[0]["loc"] == loc


def test_both_fields_at_once_is_an_error():
    assert error_of(rf(type="json_object"), so(regex="a")).param == "structured_outputs"
