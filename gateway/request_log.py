"""One line and one count per request: method, route, session, status, tokens, seconds.

``RequestLog`` wraps the whole app. It times every request to its last byte (streams included),
counts it in ``arborl_requests_total{route,status}`` and logs it on the ``arborl.access`` logger,
never with its body. The tokens come from the calls the request recorded (``note_call``, through
a context variable set for the request), so a request's line says what it cost.

A stream the client left before its end is answered 200 on the wire, but it is counted and logged
as 499 (the client closed the request, nginx's code), as the non-streaming answer to a client that
left is and as the store records it (``cancelled``): one status for one event, everywhere.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arborl.rollout.records import CallRecord

from .metrics import GatewayMetrics

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer

log = logging.getLogger("arborl.access")


@dataclass
class RequestUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: bool = False  # a call of this request ended because the client went away


_usage: contextvars.ContextVar[RequestUsage | None] = contextvars.ContextVar("arborl_request_usage", default=None)


def note_call(call: CallRecord) -> None:
    """Count a recorded call towards the request being served (if any)."""
    usage = _usage.get()
    if usage is not None:
        usage.prompt_tokens += len(call.prompt_ids)
        usage.completion_tokens += len(call.completion_ids)
        usage.cancelled |= call.status == "cancelled"


class RequestLog:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        usage = RequestUsage()
        token = _usage.set(usage)
        status, session = 500, "-"

        async def watch(message: Message) -> None:
            nonlocal status, session
            if message["type"] == "http.response.start":
                status = message["status"]
                # Set by the gateway from a checked session id only (never the client's raw text).
                session = dict(message.get("headers", [])).get(b"x-arborl-session", b"-").decode("ascii", "replace")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            _usage.reset(token)
            seconds = time.perf_counter() - started
            if usage.cancelled:
                status = CLIENT_CLOSED_REQUEST
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(seconds)
            log.info("%s %s session=%s status=%d prompt_tokens=%d completion_tokens=%d seconds=%.3f",
                     ascii(scope["method"])[1:-1], route, session, status, usage.prompt_tokens,
                     usage.completion_tokens, seconds)
