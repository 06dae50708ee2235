"""Errors as types. Each dialect renders them in its own error format.

Route handlers raise these; the app's exception handlers turn them into responses. Anything
else escaping a handler is a bug in arborl (a 500).
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status_code: int = 400
    error_type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(GatewayError):
    pass


class ContextLengthExceeded(GatewayError):
    code = "context_length_exceeded"


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "request_too_large"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    error_type = "invalid_request_error"  # what OpenAI answers for an unknown model
    code = "model_not_found"


class Overloaded(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class EngineUnavailable(GatewayError):
    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"
