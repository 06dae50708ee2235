"""The JSON events of an OpenAI-style server-sent stream: ``data: {...}`` lines up to ``data: [DONE]``.

Every server arborl streams from speaks it (an upstream's chat completions or messages, a vLLM
server's completions); each caller turns the payloads into its own events and its own errors.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx


class UnreadableEvent(ValueError):
    """A ``data:`` line that is not JSON; ``data`` is its start, for the message."""

    def __init__(self, data: str):
        super().__init__(f"an unreadable event: {data!r}")
        self.data = data


async def json_events(response: httpx.Response) -> AsyncGenerator[Any, None]:
    """The JSON payload of each ``data:`` line of ``response``, until ``[DONE]`` or the end."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError:
            raise UnreadableEvent(data[:200]) from None
        yield payload
