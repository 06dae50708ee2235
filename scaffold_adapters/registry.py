"""The known scaffolds, by the name `arborl connect` takes, and which call is which."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .aider import AiderAdapter
from .base import MAIN, CallPurpose, ScaffoldAdapter
from .claude_code import ClaudeCodeAdapter
from .cline import ClineAdapter
from .codex import CodexAdapter
from .gemini_cli import GeminiCliAdapter
from .mini_swe_agent import MiniSweAgentAdapter
from .openclaw import OpenClawAdapter
from .opencode import KiloCodeAdapter, OpenCodeAdapter
from .qwen_code import QwenCodeAdapter

ADAPTERS: dict[str, ScaffoldAdapter] = {
    adapter.name: adapter
    for adapter in (
        ClaudeCodeAdapter(), CodexAdapter(), OpenCodeAdapter(), ClineAdapter(), MiniSweAgentAdapter(),
        GeminiCliAdapter(), QwenCodeAdapter(), KiloCodeAdapter(), AiderAdapter(), OpenClawAdapter(),
    )
}


def get_adapter(name: str) -> ScaffoldAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(f"unknown scaffold {name!r}; known: {', '.join(sorted(ADAPTERS))}") from None


def call_purpose(headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose:
    """Why a call was made, as the first scaffold that recognises it says; a main call otherwise."""
    for adapter in ADAPTERS.values():
        purpose = adapter.call_purpose(headers, body)
        if purpose is not None:
            return purpose
    return MAIN
