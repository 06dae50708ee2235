"""Client text in a response header: percent-encoded, never as it came.

A header value is a line of visible ASCII; a CR or LF in it ends the header (the client gets a
broken answer, or one an attacker wrote), and a non-ASCII character cannot be encoded at all.
Whatever of a request the gateway echoes in a header goes through ``header_text``: visible ASCII
but ``%`` and ``,`` (the list separator) is kept, everything else becomes ``%XX`` of its UTF-8.
"""

from __future__ import annotations

from urllib.parse import quote

_KEPT = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%,")


def header_text(text: str) -> str:
    """``text`` as a safe header value (``urllib.parse.unquote`` gives it back)."""
    return quote(text, safe=_KEPT, errors="surrogatepass")


def header_list(items: list[str]) -> str:
    """A comma-separated header value of client strings."""
    return ",".join(header_text(item) for item in items)
