"""Tool-call syntaxes: how tools, calls and results are written into a prompt and how calls are read back.

One class per syntax a model is trained to emit:
- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen2.5, Hermes, SmolLM3 and
  LLaMA-Factory's `qwen` tool format); tool results come back in `<tool_response>` blocks.
- `react`: `Action: NAME\\nAction Input: {...}` (LLaMA-Factory's `default` tool format, which every
  template without its own format trains with, e.g. `smollm2`); results are plain user turns.
- `llama3`: a bare `{"name": ..., "parameters": {...}}` reply (Llama 3.1+ and LLaMA-Factory's `llama3`).

The prompt texts follow LLaMA-Factory's `tool_utils.py` character for character, because an adapter
trained with it must be served with the same text; `train/template.py` checks this token for token.
`forced_tag` is the xgrammar structural tag that makes `tool_choice="required"` or a named function
produce nothing but valid calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object, as text


def function_of(tool: dict) -> dict:
    """The function definition inside an OpenAI tool (`{"type": "function", "function": {...}}`)."""
    return tool.get("function", tool) if tool.get("type") == "function" else tool


def parameters_of(tool: dict) -> dict:
    params = function_of(tool).get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


class ToolFormat:
    """A tool-call syntax. Subclasses define the prompt texts, where a call starts and how to read it."""

    name = ""
    markers: tuple[str, ...] = ()  # text that begins a call in a reply
    parallel = True  # several calls in one reply

    def tools_prompt(self, tools: list[dict]) -> str:
        """Text appended to the system message to describe the tools."""
        raise NotImplementedError

    def calls_text(self, calls: list[Call]) -> str:
        """An assistant turn that makes these calls."""
        raise NotImplementedError

    def result_text(self, content: str) -> str:
        """The content of the user turn that carries a tool's result."""
        return content

    def call_start(self, text: str) -> int | None:
        """Index in `text` where a tool call begins, or None."""
        found = [i for m in self.markers if (i := text.find(m)) != -1]
        return min(found) if found else None

    def held_back(self, text: str) -> int:
        """How many trailing characters of `text` could still become a call marker (not shown yet)."""
        return max((_partial_suffix(text, m) for m in self.markers), default=0)

    def complete_block(self, text: str) -> int | None:
        """Length of the complete call block `text` starts with, when this syntax closes its calls
        (so a stream can hand it out at once); None while open or when only the reply's end closes it."""
        return None

    def parse_calls(self, text: str) -> list[Call] | None:
        """The calls in `text` (which starts at `call_start`), or None if it is not well-formed."""
        raise NotImplementedError

    def forced_tag(self, tools: list[dict], parallel: bool) -> dict:
        """xgrammar structural tag: one or more calls to `tools`, nothing else."""
        return _structural_tag(
            {
                "type": "tags_with_separator",
                "tags": self._tags(tools),
                "separator": "\n",
                "at_least_one": True,
                "stop_after_first": not (parallel and self.parallel),
            }
        )

    def triggered_tag(self, tools: list[dict], parallel: bool) -> dict:
        """xgrammar structural tag: free text, but a call, once its marker is written, is a valid call."""
        return _structural_tag(
            {
                "type": "triggered_tags",
                "triggers": [self._trigger()],
                "tags": self._tags(tools),
                "at_least_one": False,
                "stop_after_first": not (parallel and self.parallel),
            }
        )

    def _tags(self, tools: list[dict]) -> list[dict]:
        return [
            {
                "type": "tag",
                "begin": self._call_prefix(function_of(t)["name"]),
                "content": {"type": "json_schema", "json_schema": parameters_of(t)},
                "end": self._call_suffix(),
            }
            for t in tools
        ]

    def _trigger(self) -> str:
        return self.markers[0]

    def _call_prefix(self, name: str) -> str:
        raise NotImplementedError

    def _call_suffix(self) -> str:
        raise NotImplementedError


QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)


class HermesFormat(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def tools_prompt(self, tools: list[dict]) -> str:
        text = "".join("\n" + json.dumps(_wrapped(t), ensure_ascii=False) for t in tools)
        return QWEN_TOOL_PROMPT.format(tool_text=text)

    def calls_text(self, calls: list[Call]) -> str:
        return "\n".join(
            "<tool_call>\n"
            + json.dumps({"name": c.name, "arguments": json.loads(c.arguments)}, ensure_ascii=False)
            + "\n</tool_call>"
            for c in calls
        )

    def result_text(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def complete_block(self, text: str) -> int | None:
        end = text.find("</tool_call>")
        return None if end == -1 else end + len("</tool_call>")

    def parse_calls(self, text: str) -> list[Call] | None:
        calls, pos = [], 0
        for m in self._block.finditer(text):
            if text[pos : m.start()].strip():
                return None  # prose between calls: not a clean call block
            call = _json_call(m.group(1), "arguments")
            if call is None:
                return None
            calls.append(call)
            pos = m.end()
        if not calls or text[pos:].strip():
            return None
        return calls

    def _call_prefix(self, name: str) -> str:
        return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '

    def _call_suffix(self) -> str:
        return "}\n</tool_call>"


DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)


class ReactFormat(ToolFormat):
    name = "react"
    markers = ("Action:",)
    _action = re.compile(r"Action:\s*([a-zA-Z0-9_-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def tools_prompt(self, tools: list[dict]) -> str:
        tool_text, names = "", []
        for tool in tools:
            fn = function_of(tool)
            params = fn.get("parameters") or {}
            lines = ""
            for pname, p in (params.get("properties") or {}).items():
                required = ", required" if pname in params.get("required", []) else ""
                enum = (
                    ", should be one of [{}]".format(", ".join(str(e) for e in p["enum"]))
                    if p.get("enum")
                    else ""
                )
                items = (
                    ", where each item should be {}".format(p["items"].get("type", ""))
                    if p.get("items")
                    else ""
                )
                lines += (
                    f"  - {pname} ({p.get('type', '')}{required}): {p.get('description', '')}{enum}{items}\n"
                )
            tool_text += f"> Tool Name: {fn['name']}\nTool Description: {fn.get('description', '')}\nTool Args:\n{lines}\n"
            names.append(fn["name"])
        return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))

    def calls_text(self, calls: list[Call]) -> str:
        return "\n".join(f"Action: {c.name}\nAction Input: {_compact(c.arguments)}" for c in calls)

    def parse_calls(self, text: str) -> list[Call] | None:
        calls, pos = [], 0
        for m in self._action.finditer(text):
            if text[pos : m.start()].strip():
                return None
            args = _json_object(m.group(2).strip().strip('"').strip("`"))
            if args is None:
                return None
            calls.append(Call(m.group(1), args))
            pos = m.end()
        if not calls or text[pos:].strip():
            return None
        return calls

    def _call_prefix(self, name: str) -> str:
        return f"Action: {name}\nAction Input: "

    def _call_suffix(self) -> str:
        return ""


LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)


class Llama3Format(ToolFormat):
    """A reply that is only a JSON call; models with their own template render the tools themselves."""

    name = "llama3"
    parallel = False
    _python_tag = "<|python_tag|>"

    def tools_prompt(self, tools: list[dict]) -> str:
        import datetime

        date = datetime.datetime.now().strftime("%d %b %Y")
        text = "".join(json.dumps(_wrapped(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        return LLAMA3_TOOL_PROMPT.format(date=date, tool_text=text)

    def calls_text(self, calls: list[Call]) -> str:
        objs = [{"name": c.name, "parameters": json.loads(c.arguments)} for c in calls]
        return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(self._python_tag) or stripped.startswith(("{", "[")):
            return len(text) - len(stripped)
        return None

    def held_back(self, text: str) -> int:
        # Leading whitespace could still be followed by a call.
        return len(text) if not text.strip() else _partial_suffix(text.lstrip(), self._python_tag)

    def parse_calls(self, text: str) -> list[Call] | None:
        body = text.strip().removeprefix(self._python_tag).strip()
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            call = _call_from(item, "parameters") or _call_from(item, "arguments")
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def _trigger(self) -> str:
        return '{"name": '

    def _call_prefix(self, name: str) -> str:
        return '{"name": ' + json.dumps(name) + ', "parameters": '

    def _call_suffix(self) -> str:
        return "}"


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), ReactFormat(), Llama3Format())}
#: LLaMA-Factory's tool_format names -> ours (the ones a served adapter can use).
LLAMAFACTORY_FORMATS = {"default": "react", "qwen": "hermes", "llama3": "llama3"}


def _structural_tag(fmt: dict) -> dict:
    return {"type": "structural_tag", "format": fmt}


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _compact(arguments: str) -> str:
    """Arguments as LLaMA-Factory writes them (`json.dumps` with its default separators)."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except json.JSONDecodeError:
        return arguments


def _json_object(text: str) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _json_call(text: str, args_key: str) -> Call | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return _call_from(value, args_key)


def _call_from(value: Any, args_key: str) -> Call | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or args_key not in value:
        return None
    args = value[args_key]
    if isinstance(args, str):  # some models write the arguments as a JSON string
        text = _json_object(args)
        return Call(value["name"], text) if text is not None else None
    if not isinstance(args, dict):
        return None
    return Call(value["name"], json.dumps(args, ensure_ascii=False))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
