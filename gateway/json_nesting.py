"""How deep a JSON text nests arrays and objects, and the gateway's limit on it.

Python's ``json``, ``jsonschema`` and the chat templates' Jinja all recurse once per level of
nesting, and past about a thousand levels raise ``RecursionError`` (a 500, or a request body
reported as "not valid JSON"). So the gateway refuses, with a 400 that says what is wrong,
anything nested deeper than ``MAX_JSON_DEPTH`` levels before any of them runs:

- request bodies, at the HTTP layer (``app.RequestBody``), whatever the route;
- JSON carried inside strings, where it is parsed: tool-call arguments of earlier turns
  (``rendering``), which the body's own nesting does not show.

64 levels is far more than tool schemas and argument objects need (a schema nests two levels per
``properties``), and far less than the recursion the parsers survive.

The depth is measured on the text, without parsing it: escapes, string contents and everything
but brackets are stripped by C-speed passes (``re``, ``bytes.translate``), then the running depth
of what is left is a cumulative sum (numpy, in bounded chunks). Invariant: for valid JSON,
``nesting_exceeds(text, n)`` is exactly ``depth(json.loads(text)) > n``.
"""

from __future__ import annotations

import re

import numpy as np

MAX_JSON_DEPTH = 64

_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # \" and \\ inside strings, which would confuse the next pass
_STRING = re.compile(rb'"[^"]*"')
_STRUCTURE = b'"[]{}'
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(_STRUCTURE)))
_STEP = np.zeros(256, dtype=np.int8)  # what each bracket does to the depth
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_CHUNK = 1 << 20  # bytes per cumulative sum: bounds the memory of a 32 MB body to a few MB


def nesting_exceeds(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects in the JSON ``text`` nest more than ``limit`` levels deep."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= limit:  # the common case: too few brackets to nest that deep
        return False
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", raw).translate(None, _NOT_STRUCTURE))
    steps = _STEP[np.frombuffer(brackets, dtype=np.uint8)]
    level = 0
    for start in range(0, len(steps), _CHUNK):
        running = np.cumsum(steps[start : start + _CHUNK], dtype=np.int64) + level
        if running.max(initial=level) > limit:
            return True
        level = int(running[-1])
    return False
