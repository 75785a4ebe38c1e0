"""The OpenAPI document, true to what the server answers.

Every route declares the statuses it returns with OpenAI's error body (`serve.protocol.ErrorResponse`),
never FastAPI's 422 (validation errors are 400s naming the parameter); 401 and the bearer scheme
appear only when the server has an API key; token ids are bounded by the served vocabulary once the
tokenizer is loaded (the document is rebuilt then).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serve.protocol import ErrorResponse

_WHY = {
    400: "The request is invalid; `error.param` names the field.",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`).",
    403: "The request is not allowed.",
    404: "The model (or route) does not exist.",
    409: "The request conflicts with the server's state.",
    413: "The request body is over the server's limit.",
    429: "The request queue is full; retry later (see `Retry-After`).",
    500: "The engine step running this request failed; other requests were not affected.",
    503: "The model is loading, the engine stopped, or the server is shutting down.",
}


#: A streamed (`stream: true`) reply: server-sent events whose `data` is a JSON chunk, an error body
#: when generation fails after the first byte, and finally `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, an error body, or [DONE]"},
        "event": {"type": "string"},
    },
}


def streamed_200(model) -> dict:
    """`responses=` entry for a route answering JSON (`model`) or, with `stream: true`, SSE."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def error_responses(*codes: int) -> dict:
    """`responses=` for a route: each status with OpenAI's error body."""
    return {code: {"model": ErrorResponse, "description": _WHY[code]} for code in codes}


def install_openapi(app: FastAPI, *, api_key_set: bool, open_paths: set[str], vocab_size) -> None:
    """Replace `app.openapi` with a builder that tells the truth about this server's answers.

    `open_paths` answer without the API key; `vocab_size()` returns the served vocabulary size, or
    None while the model loads (the document is cached only once it is known).
    """

    def build() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, path_item in schema.get("paths", {}).items():
            for op in path_item.values():
                responses = op.get("responses", {})
                responses.pop("422", None)
                if not api_key_set or path in open_paths:
                    responses.pop("401", None)
                elif "401" in responses:
                    op["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        if api_key_set:
            components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        vocab = vocab_size()
        if vocab:
            _bound_token_ids(schema, vocab - 1)
            app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]


def _bound_token_ids(node, maximum: int) -> None:
    if isinstance(node, dict):
        if node.get("x-token-id"):
            node["maximum"] = maximum
        for value in node.values():
            _bound_token_ids(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, maximum)
