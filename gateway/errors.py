"""Errors as types. Each dialect renders them in its own error format.

Route handlers raise these; the app's exception handlers turn them into responses. Anything
else escaping a handler is a bug in arborl (a 500).
"""

from __future__ import annotations

from typing import Any

# Anthropic's error type for each status it uses.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

# Google's canonical status name for each HTTP status (google.rpc.Code as the Gemini API sends it).
GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class GatewayError(Exception):
    status_code: int = 400
    error_type: str = "invalid_request_error"
    code: str | None = None
    # Anthropic says 529 where OpenAI says 429/503 (overloaded or unavailable).
    anthropic_status_code: int | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    @property
    def anthropic_status(self) -> int:
        return self.anthropic_status_code or self.status_code

    @property
    def anthropic_message(self) -> str:
        return self.message

    def anthropic_body(self) -> dict[str, Any]:
        status = self.anthropic_status
        error_type = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
        return {"type": "error", "error": {"type": error_type, "message": self.anthropic_message}}

    @property
    def google_message(self) -> str:
        return self.message

    def google_body(self) -> dict[str, Any]:
        """Google's error shape: ``{"error": {"code", "message", "status"}}`` (HTTP status as ``code``)."""
        status = GOOGLE_STATUSES.get(self.status_code, "INVALID_ARGUMENT" if self.status_code < 500 else "INTERNAL")
        return {"error": {"code": self.status_code, "message": self.google_message, "status": status}}


class InvalidRequest(GatewayError):
    pass


class ContextLengthExceeded(GatewayError):
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, context_length: int, *, param: str | None = "messages",
                 at_least: bool = False):
        # at_least: the prompt was too long to be worth tokenising; prompt_tokens is a lower bound.
        counted = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the prompt has "
            f"{counted} tokens. Shorten the conversation.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        self._at_least = at_least

    @property
    def anthropic_message(self) -> str:
        # Claude Code recognises this wording and compacts the conversation.
        return f"prompt is too long: {self.prompt_tokens} tokens > {self.context_length - 1} maximum"

    @property
    def google_message(self) -> str:
        # The Gemini API's own wording for an over-long input.
        counted = f"at least {self.prompt_tokens}" if self._at_least else str(self.prompt_tokens)
        return (f"The input token count ({counted}) exceeds the maximum number of tokens allowed "
                f"({self.context_length - 1}).")


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "request_too_large"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status_code = 403
    error_type = "permission_error"


class NotFound(GatewayError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class ModelNotFound(NotFound):
    error_type = "invalid_request_error"  # what OpenAI answers for an unknown model
    code = "model_not_found"


class Overloaded(GatewayError):
    status_code = 429
    anthropic_status_code = 529
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class EngineUnavailable(GatewayError):
    status_code = 503
    anthropic_status_code = 529
    error_type = "server_error"
    code = "engine_unavailable"


class StoreUnreachable(GatewayError):
    """The store (its database) cannot be reached now: the call was not recorded, so it is not
    served; the store reconnects by itself, and a retry after Retry-After may succeed."""

    status_code = 503
    anthropic_status_code = 529
    error_type = "server_error"
    code = "store_unavailable"


STORE_RETRY_AFTER_SECONDS = 2  # about what the store's reconnection takes once its database is back


def store_unreachable() -> StoreUnreachable:
    """What a client is told while the store is away (never where the store is)."""
    return StoreUnreachable("the gateway cannot reach its store to record this call; retry shortly",
                            headers={"retry-after": str(STORE_RETRY_AFTER_SECONDS)})


class UpstreamFailed(GatewayError):
    """The upstream server (``upstream`` engine) refused, failed or broke off the call."""

    status_code = 502
    error_type = "api_error"
    code = "upstream_error"


class UpstreamTimeout(GatewayError):
    """The upstream server did not answer in time."""

    status_code = 504
    error_type = "api_error"
    code = "upstream_timeout"


class HTTPRefusal(GatewayError):
    """A refusal by the HTTP layer itself (unknown route, wrong method); status set per instance."""


class InternalError(GatewayError):
    """A bug in arborl: the only path to a 500."""

    status_code = 500
    error_type = "server_error"
