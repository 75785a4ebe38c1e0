"""Schemathesis hooks for the API fuzz test (`SCHEMATHESIS_HOOKS=tests.serve.schemathesis_hooks`).

Schema-valid generation requests may ask for thousands of tokens; the fuzz test is about validation
and error shapes, not throughput, so positive cases are capped at a few tokens (still schema-valid).
Negative cases are left alone: the server must reject them before generating anything.
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
    return case
