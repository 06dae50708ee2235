"""Checks on the tools a request declares, shared by every dialect."""

from __future__ import annotations

from typing import Any

import jsonschema

from .errors import InvalidRequest


def check_function_tools(tools: list[dict[str, Any]], *, field: str = "tools") -> None:
    """Refuse duplicate names and parameter schemas that are not valid JSON Schema.

    ``tools`` are in OpenAI's function form: ``{"type": "function", "function": {"name", "parameters"}}``.
    """
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param=field)
    for i, tool in enumerate(tools):
        parameters = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        try:
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except jsonschema.SchemaError as exc:
            problem = exc.message
        except (TypeError, ValueError, LookupError) as exc:  # e.g. a "$schema" that is not a string
            problem = str(exc)
        else:
            continue
        raise InvalidRequest(f"{field}[{i}] has parameters that are not a valid JSON schema: {problem}",
                             param=f"{field}[{i}]")


def check_chosen_tool(tools: list[dict[str, Any]] | None, name: str, *, field: str = "tool_choice") -> None:
    """A tool_choice that names a function must name one of the declared tools."""
    if name not in {tool["function"]["name"] for tool in tools or ()}:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param=field)
