"""Checks on the tools a request declares, shared by every dialect.

One rule for tool names in every dialect (``TOOL_NAME_PATTERN``): 1-128 letters, digits, ``_``,
``.`` and ``-``, the union of what OpenAI (64 characters, with ``.``) and Anthropic (128, without)
accept, so no agent written against either is refused, and every tool-call syntax the parsers read
(JSON, ``<function=NAME>``) can carry the name.

A tool's parameter schema is checked as JSON Schema by ``jsonschema``; anything it cannot handle
(a ``$schema`` that is a number, an unknown draft) is the client's error, a 400. Nesting is
bounded before this runs (``json_nesting``), so the check cannot recurse out of the stack.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

from .errors import InvalidRequest

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_.\-]{1,128}$"
_TOOL_NAME = re.compile(TOOL_NAME_PATTERN[1:-1])


def check_function_tools(tools: list[dict[str, Any]], *, field: str = "tools") -> None:
    """Refuse duplicate names and parameter schemas that are not valid JSON Schema.

    ``tools`` are in OpenAI's function form: ``{"type": "function", "function": {"name", "parameters"}}``.
    """
    names = [tool["function"]["name"] for tool in tools]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise InvalidRequest(f"{field}[{i}] has an invalid name: use 1-128 characters from a-z A-Z 0-9 _ . -",
                                 param=f"{field}[{i}]")
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param=field)
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            where = f"{field}[{i}]"
            raise InvalidRequest(f"{where} has parameters that are not a JSON schema object", param=where)
        try:
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except jsonschema.SchemaError as exc:
            problem = exc.message
        except Exception as exc:  # noqa: BLE001 - whatever jsonschema cannot handle is the schema's fault
            problem = f"{type(exc).__name__}: {exc}"
        else:
            continue
        raise InvalidRequest(f"{field}[{i}] has parameters that are not a valid JSON schema: {problem}",
                             param=f"{field}[{i}]")


def check_chosen_tool(tools: list[dict[str, Any]] | None, name: str, *, field: str = "tool_choice") -> None:
    """A tool_choice that names a function must name one of the declared tools."""
    if name not in {tool["function"]["name"] for tool in tools or ()}:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param=field)
