"""Request fields that ask for structured output, and turning them into one `OutputConstraint`.

- OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (chat, and completions as vLLM
  accepts it there);
- vLLM's `structured_outputs`: exactly one of `json` (a schema), `regex`, `choice`, `grammar` (EBNF or
  Lark), `json_object`, `structural_tag`, so clients written for vLLM work unchanged.

The models take what clients send; `output_constraint` checks the meaning and raises `GrammarError`
with the exact field (`response_format.json_schema.schema`) so the client sees which part is wrong.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.structured.schema_check import unenforced_keywords
from serve.structured.spec import GrammarError, OutputConstraint

SCHEMA_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(pattern=SCHEMA_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


# `json_schema` is required with type json_schema; said in the schema so generated clients know it.
_JSON_SCHEMA_NEEDS_SPEC = {
    "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
    "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_JSON_SCHEMA_NEEDS_SPEC)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
# Exactly one constraint field is given (not null).
_EXACTLY_ONE = {
    "oneOf": [{"required": [k], "properties": {k: {"not": {"type": "null"}}}} for k in CONSTRAINT_FIELDS]
}


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` request field (vLLM >= 0.11): exactly one constraint."""

    model_config = ConfigDict(
        extra="forbid", strict=True, populate_by_name=True, json_schema_extra=_EXACTLY_ONE
    )

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    # Schemas already forbid properties they do not list unless they say otherwise; accepted for vLLM clients.
    disable_additional_properties: bool = False


_FORCED_TOOLS = {"anyOf": [{"enum": ["auto", "required"]}, {"type": "object"}]}
_JSON_FORMAT = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["json_object", "json_schema"]}},
}
#: Chat-request rules across fields, stated in the OpenAPI document (each is also checked in code):
#: tool_choice other than "none" needs tools; one way of constraining the output at a time.
CHAT_RULES = [
    {
        "if": {"required": ["tool_choice"], "properties": {"tool_choice": _FORCED_TOOLS}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
    },
    {
        "not": {
            "required": ["response_format", "structured_outputs"],
            "properties": {"response_format": _JSON_FORMAT, "structured_outputs": {"type": "object"}},
        }
    },
    *(
        {
            "not": {
                "required": ["tool_choice", other],
                "properties": {
                    "tool_choice": {"anyOf": [{"enum": ["required"]}, {"type": "object"}]},
                    other: _JSON_FORMAT if other == "response_format" else {"type": "object"},
                },
            }
        }
        for other in ("response_format", "structured_outputs")
    ),
]


def output_constraint(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> OutputConstraint | None:
    """The one constraint these fields ask for (None: free text); GrammarError names the bad field."""
    from_format = _from_response_format(response_format) if response_format is not None else None
    from_vllm = _from_structured_outputs(structured) if structured is not None else None
    if from_format is not None and from_vllm is not None:
        raise GrammarError(
            "give either response_format or structured_outputs, not both", "structured_outputs"
        )
    return from_format or from_vllm


def _from_response_format(rf: ResponseFormat) -> OutputConstraint | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return OutputConstraint.json_object("response_format")
    spec = rf.json_schema
    if spec is None:
        raise GrammarError(
            'response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}',
            "response_format.json_schema",
        )
    return _schema_constraint(spec.schema_, "response_format.json_schema.schema", strict=bool(spec.strict))


def _from_structured_outputs(so: StructuredOutputs) -> OutputConstraint | None:
    given = {
        name: value
        for name, value in (
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object),
            ("structural_tag", so.structural_tag),
        )
        if value is not None
    }
    if len(given) != 1:
        raise GrammarError(
            "structured_outputs takes exactly one of json, regex, choice, grammar, json_object, structural_tag"
            + (f" (got {', '.join(given)})" if given else ""),
            "structured_outputs",
        )
    (name, value), param = next(iter(given.items())), f"structured_outputs.{next(iter(given))}"
    if name == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the schema is not valid JSON: {exc}", param) from None
        constraint = _schema_constraint(value, param, strict=False)
    elif name == "regex":
        constraint = OutputConstraint.regex(value, param)
    elif name == "choice":
        constraint = OutputConstraint.choice(value, param)
    elif name == "grammar":
        constraint = OutputConstraint.grammar(value, param)
    elif name == "json_object":
        if not value:
            return None
        constraint = OutputConstraint.json_object(param)
    else:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the structural tag is not valid JSON: {exc}", param) from None
        if not isinstance(value, dict):
            raise GrammarError("the structural tag must be a JSON object", param)
        constraint = OutputConstraint.structural_tag(value, param)
    if so.disable_any_whitespace:
        constraint = constraint.compacted()
    return constraint


def _schema_constraint(schema: Any, param: str, *, strict: bool) -> OutputConstraint:
    constraint = OutputConstraint.json_schema(schema, param)
    if strict:
        problems = unenforced_keywords(schema)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise GrammarError(
                f"strict is true but the schema uses what constrained decoding cannot guarantee: {shown}. "
                "Remove those keywords or send strict: false (best effort).",
                param,
            )
    return constraint
