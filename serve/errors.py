"""API errors in one place: typed exceptions mapped once to OpenAI's error shape.

Every 4xx/5xx body is `{"error": {"message", "type", "param", "code"}}`. Messages are written for
the client: no stack traces and no server file paths.
"""

from __future__ import annotations


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
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


class InternalError(APIError):
    status_code = 500
    type = "server_error"
    code = "internal_error"
