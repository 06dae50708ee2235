"""Reading a Chat Completions request body the way the adapters recognise calls by their prompts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def first_message_text(body: Mapping[str, Any], roles: tuple[str, ...]) -> str:
    """The text of the first message with one of ``roles`` (a string or text parts), leading space
    stripped; "" when there is none."""
    for message in body.get("messages") or ():
        if not isinstance(message, Mapping) or message.get("role") not in roles:
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return content.lstrip() if isinstance(content, str) else ""
    return ""
