"""Read a style reference set: each row becomes the chat prompt before the last assistant turn and
that turn as the reference reply.

Reads the formats `llm-data` reads: alpaca (`instruction`/`input`/`output`, optional `system` and
`history`), sharegpt (`conversations` of `{from, value}`) and OpenAI messages (`messages` of
`{role, content}`), as a JSON list or JSONL. Library code: raises `ReferenceDataError` naming the
file and row.

    from eval.refdata import read_reference_set
    examples = read_reference_set(Path("data/persona/test.jsonl"), limit=20)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES |= {"system": "system", "observation": "user", "function_call": "assistant"}


class ReferenceDataError(ValueError):
    """The reference set cannot be used; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class ReferenceExample:
    """One prompt (chat messages ending with a user turn) and the reference reply to it."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    reference: str
    row: int  # 1-based row in the source file

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def prompt(self) -> str:
        """The last user turn, for tables and the judge."""
        return next((c for r, c in reversed(self.messages) if r == "user"), "")


def read_reference_set(path: Path, limit: int | None = None) -> list[ReferenceExample]:
    """Read `path` (JSON list or JSONL) into reference examples, in file order, at most `limit`."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceDataError(f"reference set {path} does not exist (give --data a JSON or JSONL file)")
    rows = _read_rows(path)
    examples: list[ReferenceExample] = []
    for i, row in enumerate(rows, start=1):
        examples.append(_to_example(path, i, row))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ReferenceDataError(
            f"reference set {path} is empty: it needs rows in alpaca, sharegpt or OpenAI messages format "
            "(use the held-out split that `llm-data` wrote)"
        )
    return examples


def _read_rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReferenceDataError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from exc
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ReferenceDataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
    return rows


def _to_example(path: Path, row: int, data: object) -> ReferenceExample:
    where = f"{path} row {row}"
    if not isinstance(data, dict):
        raise ReferenceDataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "messages" in data or "conversations" in data:
        turns = _chat_turns(where, data.get("messages", data.get("conversations")))
    elif "instruction" in data:
        turns = _alpaca_turns(where, data)
    else:
        raise ReferenceDataError(
            f"{where}: unknown format (keys {sorted(data)[:8]}); expected alpaca (instruction/output), "
            "sharegpt (conversations) or OpenAI messages (messages)"
        )
    if "system" in data and isinstance(data["system"], str) and data["system"] and turns[0][0] != "system":
        turns.insert(0, ("system", data["system"]))
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise ReferenceDataError(f"{where}: needs a user turn followed by a final assistant reply")
    reference = turns[-1][1]
    if not reference.strip():
        raise ReferenceDataError(f"{where}: the reference (last assistant) reply is empty")
    return ReferenceExample(messages=tuple(turns[:-1]), reference=reference, row=row)


def _chat_turns(where: str, turns: object) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise ReferenceDataError(f"{where}: 'messages'/'conversations' must be a non-empty list")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ReferenceDataError(f"{where}: turn {j} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        mapped = SHAREGPT_ROLES.get(str(role))
        if mapped is None or not isinstance(content, str):
            raise ReferenceDataError(f"{where}: turn {j} has role {role!r} / content that is not text")
        out.append((mapped, content))
    return out


def _alpaca_turns(where: str, data: dict) -> list[tuple[str, str]]:
    instruction, extra, output = data.get("instruction"), data.get("input") or "", data.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise ReferenceDataError(f"{where}: alpaca rows need text 'instruction' and 'output'")
    turns: list[tuple[str, str]] = []
    for pair in data.get("history") or []:
        if isinstance(pair, list) and len(pair) == 2:
            turns += [("user", str(pair[0])), ("assistant", str(pair[1]))]
    user = f"{instruction}\n{extra}" if extra else instruction
    return turns + [("user", user), ("assistant", output)]
