"""What a request's output must match, as plain data: built by the HTTP layer, used by every engine.

An `OutputConstraint` carries the constraint in the text form the grammar compiler takes (schema JSON
in the client's key order, a regex, EBNF, a structural tag) and the request field it came from, so a
compile error is a 400 naming that field. No xgrammar here: the vLLM engine maps the same object onto
vLLM's own structured-output parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]


class GrammarError(ValueError):
    """A constraint the grammar compiler rejects; `param` is the request field, the message the reason."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OutputConstraint:
    kind: ConstraintKind
    #: schema JSON (client's key order: property order matters), regex, JSON list of choices, EBNF or Lark
    #: grammar, or structural-tag JSON; "" for json_object.
    value: str
    #: the request field it came from (e.g. "response_format.json_schema.schema"), named in errors
    param: str
    #: JSON without optional whitespace (vLLM's `disable_any_whitespace`)
    compact: bool = False

    @property
    def key(self) -> tuple[str, str, bool]:
        """Cache key: the same constraint from another field compiles to the same grammar."""
        return (self.kind, self.value, self.compact)

    def compacted(self) -> OutputConstraint:
        return replace(self, compact=True)

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> OutputConstraint:
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"the schema must be a JSON object, got {type(schema).__name__}", param)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")), param)

    @classmethod
    def json_object(cls, param: str) -> OutputConstraint:
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: str, param: str) -> OutputConstraint:
        if not pattern:
            raise GrammarError("the regex is empty", param)
        if "\x00" in pattern:
            raise GrammarError("the regex must not contain a NUL character", param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options: list[str], param: str) -> OutputConstraint:
        if not options:
            raise GrammarError("give at least one choice", param)
        if any(not isinstance(o, str) or not o for o in options):
            raise GrammarError("every choice must be a non-empty string", param)
        return cls("choice", json.dumps(list(dict.fromkeys(options)), ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: str, param: str) -> OutputConstraint:
        if not text.strip():
            raise GrammarError("the grammar is empty", param)
        return cls("grammar", text, param)

    @classmethod
    def structural_tag(cls, tag: dict, param: str) -> OutputConstraint:
        return cls("structural_tag", json.dumps(tag, ensure_ascii=False), param)

    def choices(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choice" else []

    def schema(self) -> Any:
        return json.loads(self.value) if self.kind == "json_schema" else None


def choice_ebnf(options: list[str]) -> str:
    """An EBNF grammar whose only sentences are `options` (xgrammar's string-literal escapes)."""
    return "root ::= " + " | ".join(_ebnf_literal(o) for o in options)


def _ebnf_literal(text: str) -> str:
    # json.dumps escapes quotes, backslashes and control characters the way EBNF literals read them.
    return json.dumps(text, ensure_ascii=False)


def is_lark(grammar: str) -> bool:
    """Lark (`rule: ...`) rather than EBNF (`rule ::= ...`), as vLLM guesses it."""
    return "::=" not in grammar
