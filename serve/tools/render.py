"""Which tool-call syntax a served model uses, and turning an OpenAI conversation with tools into what
its chat template takes, so serving renders tools exactly as training did.

How a model takes tools (`tool_support`), first match wins:
1. An adapter trained by `llm-train` records LLaMA-Factory's tool format and default system prompt in
   its run manifest: LLaMA-Factory appended the tool descriptions to the system message, wrote calls
   and results in that format and the chat template rendered the result as ordinary turns, so serving
   rewrites the conversation the same way (`native=False`). `train/template.py` checks token for token
   that this equals LLaMA-Factory's own rendering.
2. A chat template that takes `tools` (Qwen2.5, Llama 3.1, Hermes...) renders tools, calls and results
   itself (`native=True`); the syntax to parse is read off the template.
3. Otherwise (the default SmolLM2 template has no tools), the Hermes syntax, written into the system
   message as in 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from serve.artifacts.run_manifest import RunManifest
from serve.tools.formats import FORMATS, LLAMAFACTORY_FORMATS, Call, ToolFormat

_TOOLS_VARIABLE = re.compile(r"\btools\b")


class ToolsUnsupportedError(ValueError):
    """The served model was trained with a tool syntax llm-serve cannot render or parse."""


@dataclass(frozen=True)
class ToolSupport:
    format: ToolFormat | None  # None: tools are refused (the message says why)
    native: bool  # the chat template renders tools and tool turns itself
    default_system: str | None = None  # system text a rewritten chat starts with when it has none
    source: str = ""  # where the choice came from, for logs and errors
    error: str | None = None


def tool_support(chat_template: str | None, manifest: RunManifest | None = None) -> ToolSupport:
    """How a model with this chat template (and, for an adapter, its run manifest) takes tools."""
    tools = manifest.template.tools if manifest is not None else None
    if tools is not None and tools.format:
        return llamafactory_support(tools.format, tools.default_system)
    if chat_template and _TOOLS_VARIABLE.search(chat_template):
        return ToolSupport(FORMATS[_native_format(chat_template)], True, source="chat template")
    return ToolSupport(FORMATS["hermes"], False, source="no tool support in the chat template: Hermes")


def llamafactory_support(lf_format: str, default_system: str | None) -> ToolSupport:
    """Tools written the way LLaMA-Factory's tool format `lf_format` writes them in training."""
    source = f"LLaMA-Factory tool format {lf_format!r}"
    ours = LLAMAFACTORY_FORMATS.get(lf_format)
    if ours is None:
        reason = (
            f"it was trained with LLaMA-Factory's {lf_format!r} tool format, which llm-serve does not parse "
            f"(supported: {', '.join(LLAMAFACTORY_FORMATS)})"
        )
        return ToolSupport(None, False, source=source, error=reason)
    return ToolSupport(FORMATS[ours], False, default_system, source=source)


def _native_format(template: str) -> str:
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return "llama3"
    return "hermes"


def render_messages(
    messages: list[dict[str, Any]], tools: list[dict] | None, support: ToolSupport
) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """OpenAI messages (role, content, tool_calls, tool_call_id) and tools -> (template messages,
    `tools=` for the template). Arguments of past calls arrive as JSON strings."""
    if support.native:
        wrapped = [
            t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools or []
        ]
        return _native(messages), wrapped or None
    fmt = support.format
    if fmt is None:
        raise ToolsUnsupportedError(support.error or "tools are not supported")
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": content + fmt.calls_text(_calls(m["tool_calls"]))})
        elif role == "tool":
            out.append({"role": "user", "content": fmt.result_text(content)})
        else:
            out.append({"role": role, "content": content})
    if tools:
        prompt = fmt.tools_prompt(tools)
        if out and out[0]["role"] == "system":
            system = out[0]["content"] or support.default_system or ""
            out[0] = {"role": "system", "content": system + prompt}
        else:
            # LLaMA-Factory writes its default system prompt ("" included) before the tools; without one,
            # the tool description alone is the system message.
            system = support.default_system
            out.insert(
                0, {"role": "system", "content": prompt.lstrip() if system is None else system + prompt}
            )
    return out, None


def _native(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {}
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = tc["function"]
                names[tc.get("id")] = fn["name"]
                # Chat templates take the arguments as a mapping (they `tojson` it themselves).
                calls.append(
                    {
                        "id": tc.get("id"),
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": _args(fn)},
                    }
                )
            msg["tool_calls"] = calls
        elif m["role"] == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("tool_call_id") in names:
                msg["name"] = names[m["tool_call_id"]]
        out.append(msg)
    return out


def _calls(tool_calls: list[dict]) -> list[Call]:
    return [
        Call(tc["function"]["name"], json.dumps(_args(tc["function"]), ensure_ascii=False))
        for tc in tool_calls
    ]


def _args(fn: dict) -> dict:
    args = fn.get("arguments")
    if isinstance(args, dict):
        return args
    try:
        value = json.loads(args or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"arguments of the call to {fn.get('name')!r} are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"arguments of the call to {fn.get('name')!r} must be a JSON object")
    return value
