"""Reading a server-sent-event stream in tests, checking each event's name against its data."""

from __future__ import annotations

import json

import httpx


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) pairs; every data object must carry its event name as ``type``."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name, (name, data)
            events.append((name, data))
    return events
