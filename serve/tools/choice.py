"""What `tools`, `tool_choice` and `parallel_tool_calls` ask of one request, checked, as plain data.

- `none`: the tools are not shown to the model and the reply is text;
- `auto` (default with tools): the model may answer or call; calls are parsed from its reply. When a
  function is `strict`, a call, once begun, is held to its parameters by a grammar (free text before);
- `required`: the reply is one or more calls (`parallel_tool_calls=false`: exactly one), by grammar;
- `{"type": "function", "function": {"name": N}}`: one call to N, by grammar.
So `required` and named choices give valid calls even from the 135M default model.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.structured.schema_check import unenforced_keywords
from serve.structured.spec import GrammarError, OutputConstraint
from serve.tools.formats import ToolFormat, function_of
from serve.tools.protocol import NamedToolChoice, Tool, ToolChoiceValue


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict]  # offered to the model (OpenAI shape); [] when tool_choice is none
    offered: frozenset[str]  # names a parsed call may use
    constraint: OutputConstraint | None  # the grammar that forces or shapes calls
    parse: bool  # read calls out of the reply


def plan_tools(
    tools: list[Tool] | None,
    tool_choice: ToolChoiceValue | None,
    parallel: bool | None,
    fmt: ToolFormat | None,
) -> ToolPlan | None:
    """None when the request has no tools; raises GrammarError naming the bad field."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise GrammarError("tool_choice needs tools", "tool_choice")
    if not tools:
        return None
    if len({t.function.name for t in tools}) != len(tools):
        raise GrammarError("function names in tools must be unique", "tools")
    for i, tool in enumerate(tools):
        if tool.function.strict and tool.function.parameters is not None:
            problems = unenforced_keywords(tool.function.parameters)
            if problems:
                raise GrammarError(
                    f"strict is true but the parameters use what constrained decoding cannot guarantee: "
                    f"{'; '.join(problems[:5])}",
                    f"tools.{i}.function.parameters",
                )
    choice = tool_choice or "auto"
    if choice == "none":
        return ToolPlan([], frozenset(), None, parse=False)
    dumped = [t.model_dump(exclude_none=True) for t in tools]
    if fmt is None:
        raise AssertionError("a tool format is needed when tools are offered")
    names = frozenset(t.function.name for t in tools)
    parallel = True if parallel is None else parallel
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise GrammarError(
                f"tool_choice names {name!r}, which is not in tools ({', '.join(sorted(names))})",
                "tool_choice.function.name",
            )
        forced = [t for t in dumped if function_of(t)["name"] == name]
        tag = fmt.forced_tag(forced, parallel=False)
        return ToolPlan(dumped, frozenset([name]), OutputConstraint.structural_tag(tag, "tool_choice"), True)
    if choice == "required":
        tag = fmt.forced_tag(dumped, parallel)
        return ToolPlan(dumped, names, OutputConstraint.structural_tag(tag, "tool_choice"), True)
    constraint = None
    if any(t.function.strict for t in tools):
        constraint = OutputConstraint.structural_tag(fmt.triggered_tag(dumped, parallel), "tools")
    return ToolPlan(dumped, names, constraint, True)
