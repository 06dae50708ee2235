"""The HTTP server in front of the gateway: uvicorn, with limits on what a connection may hold.

Every way arborl serves the gateway (``arborl serve``, the in-process gateway of ``arborl eval``
and ``arborl rollout``, the tests) builds its uvicorn configuration here, from the gateway's
settings (``GatewaySettings``):

- ``header_timeout_s``: a connection must send a request's line and headers within this time of
  opening (or of its previous response), or it is closed. uvicorn itself only times out *idle*
  keep-alive connections, so without this a client that sends half a header holds a connection,
  and a slot under ``max_connections``, for ever (slow-loris).
- ``max_header_bytes``: the request line and headers together; more is answered 431 and closed.
- ``keep_alive_timeout_s``: an idle keep-alive connection is closed after this long.
- ``max_connections``: uvicorn's ``limit_concurrency``; past it new requests get 503.

The deadline and the size limit are kept by ``GuardedHttpProtocol``, uvicorn's httptools protocol
with four hooks more; uvicorn[standard] always brings httptools.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from arborl.gateway.settings import GatewaySettings

_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
              b"connection: close\r\n\r\n")


class GuardedHttpProtocol(HttpToolsProtocol):
    """Closes a connection whose request head is not complete in time, or grows too large.

    Invariant: while a request's head is awaited a deadline is armed: from the moment a connection
    opens, and from the first byte of each later request on it (an idle keep-alive connection is
    uvicorn's own timeout's to close); the head's completion cancels it.
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 << 10

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_deadline is None:
            self._arm_head_deadline()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def server_config(app: Any, settings: GatewaySettings, *, host: str, port: int, log_level: str = "info",
                  **uvicorn_options: Any) -> Config:
    """uvicorn's configuration for serving ``app`` with the limits of ``settings``."""
    protocol = type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes})
    return Config(app, host=host, port=port, log_level=log_level, http=protocol,
                  timeout_keep_alive=settings.keep_alive_timeout_s, limit_concurrency=settings.max_connections,
                  **uvicorn_options)
