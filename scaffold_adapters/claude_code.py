"""Claude Code (`claude -p`), which speaks Anthropic Messages.

What it sends (version 2.1.x, observed against arborl): every call is
``POST /v1/messages?beta=true`` with ``x-claude-code-session-id`` and a ``claude-cli/...``
user agent. The main loop carries its tools; a sub-agent (the Agent tool) sends the same
session id plus ``x-claude-code-agent-id``; the title call has no tools and asks for a
``{"title": ...}`` JSON object through ``output_config.format``; the small/fast model's side
calls (a one-token ``quota`` probe, topic and command checks) have neither tools nor an agent
history. With ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` set, ``-p`` makes no title call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import MAIN, CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup

_TITLE_PROMPT = "sentence-case title"


class ClaudeCodeAdapter(ScaffoldAdapter):
    name = "claude-code"
    executable = "claude"
    npm_package = "@anthropic-ai/claude-code"
    tested_version = "2.1.197"
    names_its_session = "X-Claude-Code-Session-Id (stored as claude-<id>)"
    dialect = "messages"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        model = target.model
        env = {
            "ANTHROPIC_BASE_URL": target.root,
            "ANTHROPIC_AUTH_TOKEN": target.api_key,
            # Every model slot Claude Code may pick (main, small/fast side calls, per-tier
            # defaults) names the served policy, so no call asks for a model arborl lacks.
            "ANTHROPIC_MODEL": model,
            "ANTHROPIC_SMALL_FAST_MODEL": model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
            "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
            "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            # The attribution header carries a per-session hash into the system prompt, which
            # would stop sessions from sharing the system prompt's prefix cache.
            "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
        }
        notes = [
            (
                "Claude Code's default system prompt and tools take about 20k tokens; a small model's context "
                "may not hold them. Use `--tools Bash,Read,Write,Edit` and a shorter `--system-prompt`, or "
                "serve a long-context model."
            ),
            (
                "Claude Code assumes a 200k-token window: set CLAUDE_CODE_AUTO_COMPACT_WINDOW to the served "
                "context so it compacts in time."
            ),
        ]
        return ScaffoldSetup(env=env, notes=notes)

    def command(self, task: str) -> list[str]:
        return [self.executable, "-p", task, "--output-format", "json", "--dangerously-skip-permissions"]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        if "x-claude-code-session-id" not in headers and not headers.get("user-agent", "").startswith("claude-cli"):
            return None
        if agent := headers.get("x-claude-code-agent-id"):
            return CallPurpose("subagent", branch=f"agent-{agent}")
        if body.get("tools"):
            return MAIN
        if _asks_for_title(body) or _TITLE_PROMPT in _system_text(body):
            return CallPurpose("title", branch="title")
        if not _has_tool_turns(body):
            # The small/fast model's side calls (quota probe, topic and command-prefix checks) carry no
            # tools and no agent history. A main loop run with no tools at all (--tools "") looks
            # the same and is filed here too; a compaction call carries the history and stays main.
            return CallPurpose("side", branch="side")
        return MAIN


def _asks_for_title(body: Mapping[str, Any]) -> bool:
    output_format = (body.get("output_config") or {}).get("format") or {}
    properties = (output_format.get("schema") or {}).get("properties") or {}
    return "title" in properties


def _has_tool_turns(body: Mapping[str, Any]) -> bool:
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(
            isinstance(block, Mapping) and block.get("type") in ("tool_use", "tool_result") for block in content
        ):
            return True
    return False


def _system_text(body: Mapping[str, Any]) -> str:
    system = body.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return " ".join(block.get("text", "") for block in system if isinstance(block, dict))
    return ""
