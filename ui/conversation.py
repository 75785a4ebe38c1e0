"""Conversations as the page holds them, turned into API requests, feedback rows and exports.

The page's chat history is Gradio's "messages" list (`{"role", "content", ...}` dicts, extra keys
added by the browser). Beside it the page keeps `meta`, one dict per message: for each assistant reply
the model, system prompt and sampling that produced it, so exports and feedback say where a reply
came from even after the picker changed.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def text_of(message: dict) -> str:
    """The text of a chat message whatever shape the browser sent it back in."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, list):
        return "".join(text_of({"content": part}) for part in content)
    return "" if content is None else str(content)


def plain(history: list[dict]) -> list[dict]:
    """History reduced to `{"role", "content"}` with string content (and a tool-call block's title)."""
    out = []
    for m in history:
        message = {"role": m["role"], "content": text_of(m)}
        if is_tool_block(m):
            message["metadata"] = {"title": m["metadata"]["title"]}
        out.append(message)
    return out


TOOL_TITLE = "Tool call: "


def tool_call_message(name: str, arguments: str) -> dict:
    """A tool call as a titled block in the chat (Gradio shows `metadata.title` as a box)."""
    try:
        body = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except json.JSONDecodeError:
        body = arguments
    return {"role": "assistant", "content": f"```json\n{body}\n```", "metadata": {"title": TOOL_TITLE + name}}


def is_tool_block(message: dict) -> bool:
    metadata = message.get("metadata")
    return isinstance(metadata, dict) and str(metadata.get("title") or "").startswith(TOOL_TITLE)


def with_system(system: str, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def request_messages(history: list[dict], system: str) -> list[dict]:
    """What to send for the next reply: system prompt + every finished turn (empty replies dropped)."""
    # Tool-call blocks are shown, not sent: the page does not run tools, so there is no result to pair.
    turns = [
        {"role": m["role"], "content": m["content"]}
        for m in plain(history)
        if (m["role"] != "assistant" or m["content"]) and not is_tool_block(m)
    ]
    return with_system(system, turns)


def rated_messages(history: list[dict], meta: list[dict], index: int) -> list[dict]:
    """The conversation up to and including the assistant reply at `index`, with its system prompt."""
    if not 0 <= index < len(history) or history[index].get("role") != "assistant":
        raise ValueError(f"message {index} is not an assistant reply")
    system = meta[index].get("system", "") if index < len(meta) else ""
    return with_system(
        system, [{"role": m["role"], "content": m["content"]} for m in plain(history[: index + 1])]
    )


def export_payload(history: list[dict], meta: list[dict], api_base: str) -> dict[str, Any]:
    """A conversation as JSON: OpenAI-style messages, each reply tagged with model and sampling."""
    messages = []
    for i, message in enumerate(plain(history)):
        info = meta[i] if i < len(meta) else {}
        if message["role"] == "assistant":
            message |= {k: info[k] for k in ("model", "system", "sampling") if k in info}
        messages.append(message)
    systems = [m["system"] for m in messages if m.get("system")]
    return {
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "api_base": api_base,
        "system": systems[-1] if systems else "",
        "models": sorted({m["model"] for m in messages if m.get("model")}),
        "messages": messages,
    }


def write_export(payload: dict[str, Any]) -> Path:
    """Write the export into a fresh temporary folder (Gradio serves it from there) and return it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.mkdtemp(prefix="llm-ui-export-")) / f"conversation-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
