"""Which JSON-schema keywords the grammar enforces, and refusing the rest when a schema is `strict`.

xgrammar compiles any schema but silently ignores keywords it cannot turn into a grammar (measured
on xgrammar 0.2.9: `uniqueItems`, `not`, `if/then/else`, `dependentRequired`, `oneOf`'s exclusivity,
`allOf` with several parts, unknown `format`s, and `minLength`/`maxLength` beside a `pattern` or
`format`). With `strict: true` the client is promised that output validates, so such a schema is
refused naming the keyword and where it is; without `strict` they are best effort.
"""

from __future__ import annotations

from typing import Any

# Keywords whose value is one schema, a list of schemas, or a name -> schema map.
_ONE = ("additionalProperties", "unevaluatedProperties", "items", "contains", "propertyNames", "not")
_ONE += ("if", "then", "else")
_LIST = ("prefixItems", "anyOf", "allOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

#: Keywords the compiled grammar enforces (checked by a violating instance each, tests/serve/test_grammar.py).
ENFORCED = {
    "type", "enum", "const", "$ref", "anyOf", "allOf",
    "properties", "required", "additionalProperties", "unevaluatedProperties", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "dependentSchemas",
    "items", "prefixItems", "minItems", "maxItems", "contains",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "$defs", "definitions",
}  # fmt: skip
#: Keywords that only describe: nothing to enforce.
ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor",
    "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
}  # fmt: skip
#: `format` values the grammar knows; any other format is not enforced.
FORMATS = {
    "email", "date", "time", "date-time", "duration", "uuid", "ipv4", "ipv6", "hostname",
    "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
}  # fmt: skip


def unenforced_keywords(schema: Any) -> list[str]:
    """Where `schema` uses something the grammar would not enforce, as 'PATH: reason' lines."""
    problems: list[str] = []
    _walk(schema, "#", problems)
    return problems


def _walk(node: Any, path: str, out: list[str]) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        out.append(f"{path}: a schema must be an object or a boolean")
        return
    for key, value in node.items():
        here = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            out.append(f"{here}: `{key}` is not enforced by the grammar")
            continue
        if key == "format" and value not in FORMATS:
            out.append(f"{here}: format {value!r} is not enforced (known: {', '.join(sorted(FORMATS))})")
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            out.append(f"{here}: `allOf` with several schemas is not enforced; merge them into one")
        if key in _ONE:
            _walk(value, here, out)
        elif key in _LIST and isinstance(value, list):
            for i, sub in enumerate(value):
                _walk(sub, f"{here}/{i}", out)
        elif key in _MAP and isinstance(value, dict):
            for name, sub in value.items():
                _walk(sub, f"{here}/{name}", out)
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        out.append(f"{path}: minLength/maxLength beside `pattern` or `format` is not enforced")
    if "propertyNames" in node and ("properties" in node or "patternProperties" in node):
        out.append(f"{path}: `propertyNames` together with `properties` is not enforced")
    if isinstance(node.get("patternProperties"), dict) and (
        "properties" in node or len(node["patternProperties"]) > 1
    ):
        out.append(f"{path}: several `patternProperties`, or beside `properties`, are not enforced")
