"""ShareGPT rows (`conversations` of `from/value`) and OpenAI rows (`messages` of `role/content`).

Both are LLaMA-Factory's `sharegpt` formatting; the `tags` of the dataset_info entry name the roles.
An optional system message comes first, then user (or tool observation) and assistant (or function
call) turns alternate. SFT rows end with the assistant; preference prompts end with the user.

Tool rows (LLaMA-Factory's glaive format) carry a `tools` column, a JSON list of function definitions;
every function-call turn must be JSON `{"name", "arguments"}` (or a list of them, parallel calls)
naming a declared tool with an object as arguments, and every observation must answer a call.
"""

from __future__ import annotations

import json
from typing import Any

from serve.artifacts.dataset_registry import OPENAI_TAGS, DatasetEntry
from train.data.formats.base import RowError, Sample, cell, optional_text

NAME = "sharegpt"
OPENAI_NAME = "openai"


def detect(row: dict[str, Any]) -> bool:
    return _first_message_has(row, "conversations", "from")


def detect_openai(row: dict[str, Any]) -> bool:
    return _first_message_has(row, "messages", "role")


def _first_message_has(row: dict[str, Any], column: str, key: str) -> bool:
    value = row.get(column)
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and key in value[0]


def default_entry(file_name: str, row: dict[str, Any]) -> DatasetEntry:
    openai = detect_openai(row)
    columns = {"messages": "messages" if openai else "conversations"}
    columns.update({k: k for k in ("system", "tools") if k in row})
    return DatasetEntry(
        file_name=file_name,
        formatting="sharegpt",
        columns=columns,
        tags=dict(OPENAI_TAGS) if openai else None,
    )


def parse_messages(
    row: dict[str, Any], entry: DatasetEntry, *, end_with: str
) -> tuple[str, list[dict[str, str]]]:
    """System prompt and turns, checked for known roles and alternating order.

    `end_with` is "assistant" for SFT/KTO rows and "user" for preference prompts.
    """
    column = entry.column("messages")
    messages = cell(row, column, "messages")
    if not isinstance(messages, list):
        raise RowError(f"messages (column {column!r}) must be a list of message objects")
    if not messages:
        raise RowError(f"no messages (column {column!r} is empty)")
    role_tag, content_tag = entry.tag("role_tag"), entry.tag("content_tag")
    roles = {
        entry.tag("user_tag"): "user",
        entry.tag("observation_tag"): "tool",
        entry.tag("assistant_tag"): "assistant",
        entry.tag("function_tag"): "function",
    }
    roles.pop(None, None)
    system_tag = entry.tag("system_tag")
    system = optional_text(row, entry.column("system"), "system")
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or role_tag not in message or content_tag not in message:
            raise RowError(f"message {i} must be an object with {role_tag!r} and {content_tag!r}")
        tag, content = message[role_tag], message[content_tag]
        if i == 1 and system_tag is not None and tag == system_tag:
            if not isinstance(content, str):
                raise RowError("message 1 (system) content must be a string")
            system = content
            continue
        if tag not in roles:
            known = ", ".join(repr(t) for t in [*roles, system_tag] if t is not None)
            raise RowError(f"unknown role tag {tag!r} in message {i} (expected one of {known})")
        if not isinstance(content, str):
            raise RowError(f"message {i} content must be a string, got {type(content).__name__}")
        role = roles[tag]
        want_user = len(turns) % 2 == 0
        if want_user != (role in ("user", "tool")):
            expected = (
                f"{entry.tag('user_tag')!r} or {entry.tag('observation_tag')!r}"
                if want_user
                else f"{entry.tag('assistant_tag')!r} or {entry.tag('function_tag')!r}"
            )
            raise RowError(f"wrong role order: message {i} is {tag!r}, expected {expected}")
        if role in ("assistant", "function") and not content.strip():
            raise RowError(f"empty output: assistant message {i} has no content")
        turns.append({"role": role, "content": content})
    if not turns:
        raise RowError("no user or assistant messages after the system message")
    last_is_user = turns[-1]["role"] in ("user", "tool")
    if end_with == "assistant" and last_is_user:
        raise RowError(
            f"missing output: the last message must be from the assistant ({entry.tag('assistant_tag')!r})"
        )
    if end_with == "user" and not last_is_user:
        raise RowError("the prompt must end with a user message; the responses go in chosen/rejected")
    return system, turns


def parse_tools(row: dict[str, Any], entry: DatasetEntry) -> list[dict[str, Any]] | None:
    """The row's tool definitions (None when it has none); a RowError says what is wrong with them."""
    column = entry.column("tools")
    value = cell(row, column, "tools", required=False)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"tools (column {column!r}) is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise RowError(f"tools (column {column!r}) must be a JSON list of function definitions")
    tools = []
    for i, tool in enumerate(value, start=1):
        fn = tool.get("function", tool) if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"tool {i} in tools (column {column!r}) must be an object with a name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RowError(f"tool {fn['name']!r}: parameters must be a JSON-schema object")
        tools.append(fn)
    return tools


def parse_call(content: str, declared: set[str], where: str) -> list[dict[str, Any]]:
    """The calls of one function-call turn; a RowError names what is wrong."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        raise RowError(f"{where}: function call is not valid JSON ({exc})") from None
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowError(f"{where}: function call lists no call")
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RowError(f'{where}: function call must be {{"name": ..., "arguments": {{...}}}}')
        if call["name"] not in declared:
            known = ", ".join(sorted(declared)) or "none (the row has no tools)"
            raise RowError(
                f"{where}: function call names {call['name']!r}, which is not a declared tool ({known})"
            )
        if not isinstance(call.get("arguments"), dict):
            raise RowError(f"{where}: arguments of {call['name']!r} must be a JSON object")
    return calls


def check_tool_turns(turns: list[dict[str, str]], tools: list[dict[str, Any]] | None) -> None:
    declared = {t["name"] for t in tools or []}
    for i, turn in enumerate(turns):
        where = f"turn {i + 1}"
        if turn["role"] == "function":
            parse_call(turn["content"], declared, where)
        elif turn["role"] == "tool" and (i == 0 or turns[i - 1]["role"] != "function"):
            raise RowError(f"{where}: an observation (tool result) must follow a function call")


def parse(row: dict[str, Any], entry: DatasetEntry) -> Sample:
    system, turns = parse_messages(row, entry, end_with="assistant")
    tools = parse_tools(row, entry)
    check_tool_turns(turns, tools)
    return Sample(
        system=system,
        messages=turns[:-1],
        response=turns[-1]["content"],
        tools=tools,
        response_role=turns[-1]["role"],
    )
