"""Schemathesis hooks for the API fuzz test (`SCHEMATHESIS_HOOKS=tests.serve.schemathesis_hooks`).

Schema-valid generation requests may ask for thousands of tokens; the fuzz test is about validation
and error shapes, not throughput, so positive cases are capped at a few tokens (still schema-valid).
Negative cases are left alone: the server must reject them before generating anything.

Whether a regex, a grammar, a JSON schema or a function's parameters compile is beyond what JSON
Schema can say, so in positive cases those free-form values become small valid ones (and past tool
calls get JSON arguments, named tool choices a function that exists); their 400s for invalid values
are tested in tests/serve/test_app_structured.py. Negative cases are not touched.
"""

import schemathesis

CAP = 4


@schemathesis.hook
def map_case(ctx, case):
    body = case.body
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if positive and isinstance(body, dict) and ("messages" in body or "prompt" in body):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > CAP:
                body[key] = CAP
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = CAP
        _valid_constraints(body)
    return case


def _valid_constraints(body: dict) -> None:
    so = body.get("structured_outputs")
    if isinstance(so, dict):
        fixes = {"regex": "[a-z]{1,3}", "grammar": 'root ::= "a"', "json": {"type": "object"}}
        fixes["structural_tag"] = {"type": "structural_tag", "format": {"type": "const_string", "value": "a"}}
        for key, value in fixes.items():
            if so.get(key) is not None:
                so[key] = value
    rf = body.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
        rf["json_schema"]["schema"] = {"type": "object"}
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
                tool["function"]["name"] = f"f{i}"
                tool["function"]["parameters"] = {"type": "object"}
                tool["function"].pop("strict", None)
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and tools:
            choice["function"]["name"] = "f0"
    for message in body.get("messages") or []:
        for call in (message.get("tool_calls") or []) if isinstance(message, dict) else []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                call["function"]["arguments"] = "{}"
