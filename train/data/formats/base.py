"""What every format module returns: a `Sample` (system, prompt turns, response) or a `RowError` reason.

Each format module (alpaca, sharegpt, dpo, kto, pretrain) has `NAME`, `detect(row)`,
`default_entry(file_name, row)` and `parse(row, entry) -> Sample`; `parse` raises `RowError` with a
reason a user can act on, which the validator prints as `FILE:ROW: reason`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class RowError(ValueError):
    """One row does not fit its format; the message is the reason shown after `FILE:ROW:`."""


@dataclass
class Sample:
    """One row in OpenAI chat roles: `messages` ends with the user turn the response answers."""

    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    response: str | None = None  # sft/kto response, dpo chosen
    rejected: str | None = None  # dpo only
    label: bool | None = None  # kto only
    text: str | None = None  # pretrain only
    tools: list[dict[str, Any]] | None = None  # tool rows: function definitions
    response_role: str = "assistant"  # "function" when the response is a tool call

    @property
    def has_tools(self) -> bool:
        roles = {m["role"] for m in self.messages} | {self.response_role}
        return bool(self.tools) or bool(roles & {"function", "tool"})

    def conversation(self) -> list[dict[str, Any]]:
        """The full chat (system, turns, response) as `tokenizer.apply_chat_template` takes it.

        Tool rows come out in OpenAI's shape: function-call turns as assistant messages with
        `tool_calls` (arguments as JSON text), observations as `tool` messages answering them."""
        chat: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        turns = list(self.messages)
        if self.response is not None:
            turns.append({"role": self.response_role, "content": self.response})
        last_ids: list[str] = []
        for turn in turns:
            if turn["role"] == "function":
                calls = json.loads(turn["content"])
                calls = calls if isinstance(calls, list) else [calls]
                last_ids = [f"call_{len(chat)}_{j}" for j in range(len(calls))]
                tool_calls = [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": c["name"],
                            "arguments": json.dumps(c["arguments"], ensure_ascii=False),
                        },
                    }
                    for call_id, c in zip(last_ids, calls, strict=True)
                ]
                chat.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
            elif turn["role"] == "tool":
                chat.append(
                    {
                        "role": "tool",
                        "tool_call_id": last_ids[0] if last_ids else "",
                        "content": turn["content"],
                    }
                )
            else:
                chat.append(dict(turn))
        return chat


def cell(row: dict[str, Any], column: str | None, what: str, *, required: bool = True) -> Any:
    """The value of `column` in `row`; a missing required column is a RowError naming it."""
    if column is None:
        if required:
            raise RowError(f"no column is mapped to {what}; give it in --columns")
        return None
    if column not in row:
        if required:
            raise RowError(f"missing {what} (column {column!r})")
        return None
    return row[column]


def text_cell(row: dict[str, Any], column: str | None, what: str, *, allow_empty: bool = False) -> str:
    """A required string cell; missing, non-string or (unless allowed) blank values are errors."""
    value = cell(row, column, what)
    if value is None:
        raise RowError(f"missing {what} (column {column!r} is null)")
    if not isinstance(value, str):
        raise RowError(f"{what} (column {column!r}) must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"empty {what} (column {column!r})")
    return value


def optional_text(row: dict[str, Any], column: str | None, what: str) -> str:
    value = cell(row, column, what, required=False)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{what} (column {column!r}) must be a string, got {type(value).__name__}")
    return value
