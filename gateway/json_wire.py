"""JSON as the gateway writes it onto the wire: response bodies and SSE event data.

Every dialect encodes through ``json_bytes``, so one rule holds everywhere: what a client sent
can always be sent back. JSON lets a request carry a lone UTF-16 surrogate (``"\\ud800"``) that
UTF-8 cannot encode; echoing it (Responses echoes ``instructions`` and ``metadata``) must not fail
after the model ran. Such a body goes out with non-ASCII characters escaped, which is the same
JSON value, so the client reads back exactly what it sent. Everything else goes out as UTF-8.
NaN and infinities are not JSON and are refused (as by FastAPI's own encoder): none should ever reach a response.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse as _JSONResponse


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON in UTF-8; with ``\\uXXXX`` escapes if it holds a lone surrogate."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


class JSONResponse(_JSONResponse):
    """FastAPI's JSON response, encoded by ``json_bytes``."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def sse_event(name: str | None, data: Any) -> bytes:
    """One server-sent event: ``event: NAME`` (when named) and its JSON ``data``."""
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json_bytes(data) + b"\n\n"
