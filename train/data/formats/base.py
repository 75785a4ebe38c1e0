"""What every format module returns: a `Sample` (system, prompt turns, response) or a `RowError` reason.

Each format module (alpaca, sharegpt, dpo, kto, pretrain) has `NAME`, `detect(row)`,
`default_entry(file_name, row)` and `parse(row, entry) -> Sample`; `parse` raises `RowError` with a
reason a user can act on, which the validator prints as `FILE:ROW: reason`.
"""

from __future__ import annotations

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

    def conversation(self) -> list[dict[str, str]]:
        """The full chat (system, turns, response) as `tokenizer.apply_chat_template` takes it."""
        chat = [{"role": "system", "content": self.system}] if self.system else []
        chat += self.messages
        if self.response is not None:
            chat.append({"role": "assistant", "content": self.response})
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
