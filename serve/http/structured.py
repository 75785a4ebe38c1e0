"""Structured output and tool calls for a route: plan before generating, shape the reply after.

`plan_output` turns a request's `response_format` / `structured_outputs` / `tools` / `tool_choice` into
one checked constraint, compiles it in a worker thread (cached per constraint) so the engine loop never
compiles, and knows how to read tool calls back. `ReplyShaper` turns one choice's generated text into
`content` + `tool_calls` + `finish_reason`, whole or as stream deltas. Errors are `BadRequestError`s
naming the request field.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.errors import BadRequestError
from serve.structured.compiler import GrammarCompiler
from serve.structured.protocol import ResponseFormat, StructuredOutputs, output_constraint
from serve.structured.spec import GrammarError, OutputConstraint
from serve.tools.choice import ToolPlan, plan_tools
from serve.tools.formats import ToolFormat
from serve.tools.parser import ParsedReply, ToolCallParser
from serve.tools.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, new_call_id
from serve.tools.render import ToolSupport


@dataclass
class OutputPlan:
    constraint: OutputConstraint | None = None
    grammar: object | None = None  # compiled for the engine's tokenizer
    tools: ToolPlan | None = None
    format: ToolFormat | None = None

    @property
    def offered_tools(self) -> list[dict] | None:
        """The tools to render into the prompt (None: none)."""
        return self.tools.tools if self.tools is not None and self.tools.tools else None

    def shaper(self) -> ReplyShaper:
        return ReplyShaper(self)


async def plan_output(
    compiler: GrammarCompiler | None,
    *,
    response_format: ResponseFormat | None = None,
    structured_outputs: StructuredOutputs | None = None,
    tools=None,
    tool_choice=None,
    parallel_tool_calls: bool | None = None,
    support: ToolSupport | None = None,
) -> OutputPlan:
    """Check and compile what the request asks of its output; BadRequestError names the bad field."""
    try:
        constraint = output_constraint(response_format, structured_outputs)
        fmt = None
        if tools and tool_choice != "none":
            if support is None or support.format is None:
                reason = support.error if support is not None else "this model takes no tools"
                raise GrammarError(f"this model cannot be served with tools: {reason}", "tools")
            fmt = support.format
        tool_plan = plan_tools(tools, tool_choice, parallel_tool_calls, fmt)
        if tool_plan is not None and tool_plan.constraint is not None:
            if constraint is not None:
                raise GrammarError(
                    f"{constraint.param} cannot be combined with tool_choice={tool_choice!r} or strict "
                    "functions: both constrain the whole reply",
                    constraint.param,
                )
            constraint = tool_plan.constraint
        grammar = None
        if constraint is not None:
            if compiler is None:
                raise GrammarError("this server cannot compile grammars", constraint.param)
            grammar = await compiler.compile_async(constraint)
    except GrammarError as exc:
        raise BadRequestError(str(exc), param=exc.param) from None
    return OutputPlan(constraint, grammar, tool_plan, fmt)


class ReplyShaper:
    """One choice's text -> content, tool calls and finish reason (whole, or as stream deltas)."""

    def __init__(self, plan: OutputPlan):
        self.parser = None
        self.calls = 0  # calls handed out so far: the index of the next stream delta
        if plan.tools is not None and plan.tools.parse and plan.format is not None:
            self.parser = ToolCallParser(plan.format, set(plan.tools.offered))

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """Content that can be streamed now and the deltas of calls completed by `text`."""
        if self.parser is None:
            return text, []
        return self._out(self.parser.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[str, list[DeltaToolCall], str | None]:
        """The rest of the content and calls, and the finish reason: "tool_calls" when the model
        stopped after making calls ("length" stays "length")."""
        if self.parser is None:
            return "", [], finish_reason
        content, deltas = self._out(self.parser.finish())
        if self.calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, deltas, finish_reason

    def whole(
        self, text: str, finish_reason: str | None
    ) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """A complete reply: (content or None, tool calls or None, finish reason)."""
        shown, first = self.feed(text)
        rest, last, finish_reason = self.finish(finish_reason)
        calls = [
            ToolCall(id=d.id, function=FunctionCall(name=d.function.name, arguments=d.function.arguments))
            for d in first + last
        ]
        content = shown + rest
        if calls:
            content = content.strip() or None
        return content, calls or None, finish_reason

    def _out(self, parsed: ParsedReply) -> tuple[str, list[DeltaToolCall]]:
        deltas = []
        for call in parsed.calls:
            fn = DeltaFunctionCall(name=call.name, arguments=call.arguments)
            deltas.append(DeltaToolCall(index=self.calls, id=new_call_id(), type="function", function=fn))
            self.calls += 1
        return parsed.content, deltas


def history_messages(messages) -> list[dict]:
    """Request messages as the renderer takes them: role, text content, tool calls, tool call id."""
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict = {"role": role, "content": m.text()}
        calls = getattr(m, "tool_calls", None)
        if calls:
            msg["tool_calls"] = [c.model_dump() for c in calls]
        if role == "tool":
            msg["tool_call_id"] = getattr(m, "tool_call_id", None)
        out.append(msg)
    return out
