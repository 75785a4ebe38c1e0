"""API errors in one place: typed exceptions mapped once to OpenAI's error shape.

Every 4xx/5xx body is `{"error": {"message", "type", "param", "code"}}` (`serve.protocol.ErrorResponse`).
Messages are written for the client: no stack traces and no server file paths. `to_api_error` is the
one mapping from anything an engine or a route may raise to the status a client sees; the app's
handlers, the generation path and the SSE writer all use it.
"""

from __future__ import annotations

import logging

from serve.adapters import AdapterError
from serve.engine.types import (
    EngineDeadError,
    EngineOverloadedError,
    GenerationFailedError,
    InvalidGenerationRequest,
    UnknownAdapterError,
)

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def body(self) -> dict:
        """OpenAI's error body; `serve.protocol.ErrorResponse` documents it in the OpenAPI document."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ConflictError(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class PermissionDeniedError(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class MethodNotAllowedError(APIError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class InternalError(APIError):
    status_code = 500
    type = "server_error"
    code = "internal_error"


def to_api_error(exc: BaseException) -> APIError:
    """The API error a client sees for `exc`, raised by a route, the generation path or an engine."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return RateLimitError(f"{exc}; retry later", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return ServiceUnavailableError(f"the engine stopped ({exc}); restart the server", code="engine_dead")
    if isinstance(exc, UnknownAdapterError):
        # Engine keys of adapters loaded while serving are NAME@VERSION; the client knows NAME.
        name = exc.name.rpartition("@")[0] or exc.name
        return NotFoundError(f"the model `{name}` was unloaded or deleted", param="model")
    if isinstance(exc, AdapterError):
        return adapter_error(exc)
    if isinstance(exc, InvalidGenerationRequest):
        return BadRequestError(str(exc), param=exc.param)
    if isinstance(exc, GenerationFailedError):
        return InternalError(
            f"generation failed: {exc}; other requests were not affected, see the server log",
            code="generation_failed",
        )
    logger.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    return InternalError("internal server error; see the server log")


def adapter_error(exc: Exception) -> APIError:
    """The API error for a refused adapter (serve.adapters' typed errors; messages carry no server paths)."""
    from serve.adapters import AdapterConflict, AdapterMissing, AdapterPathError

    if isinstance(exc, AdapterPathError):
        return PermissionDeniedError(str(exc), param="lora_path")
    if isinstance(exc, AdapterMissing):
        return NotFoundError(str(exc), param="model", code="adapter_not_found")
    if isinstance(exc, AdapterConflict):
        return ConflictError(str(exc), param="model", code="adapter_conflict")
    return BadRequestError(str(exc), param="model", code="adapter_invalid")
