"""Qwen Code (`qwen`), a fork of Gemini CLI that speaks OpenAI Chat Completions.

What it sends (version 0.24.4, observed against arborl): every call is a streaming
``POST {OPENAI_BASE_URL}/chat/completions`` with ``stream_options``, ``max_tokens`` and its 14
tools (``run_shell_command``, ``write_file``, ``edit``, ``read_file``, ...), from the ``openai``
SDK (``User-Agent: QwenCode/0.24.4 (linux; x64)``, ``x-stainless-*`` headers,
``Authorization: Bearer``). The system prompt is about 27k characters; the first user message
is three text parts (skills, the date, the task). It sends no session id of its own: give each
run a ``/s/{session}`` base URL, as the orchestrator does.

- History comes back as it was served: assistant turns with the tool-call ids and argument
  strings as sampled, tool results as content-part lists, so every call stitches onto the
  previous one. ``write_file`` takes only absolute paths (a relative one fails with "File path
  must be absolute"); a failed shell command comes back as ``...Exit Code: 1...``.
- Its side calls (title generation, compaction, follow-up suggestions, tool-use summaries on a
  ``fastModel``) carry no tools: they are filed in the session's ``side`` trie. A headless run of
  a short task made none in these tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import MAIN, CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup

USER_AGENT = "QwenCode/"


class QwenCodeAdapter(ScaffoldAdapter):
    name = "qwen-code"
    executable = "qwen"
    npm_package = "@qwen-code/qwen-code"
    tested_version = "0.24.4"
    names_its_session = None
    dialect = "chat"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        settings = {
            "security": {"auth": {"selectedType": "openai"}, "folderTrust": {"enabled": False}},
            "model": {"name": target.model},
            "privacy": {"usageStatisticsEnabled": False},
            "telemetry": {"enabled": False},
            "general": {"enableAutoUpdate": False},
            "ui": {"enableFollowupSuggestions": False},
        }
        env = {
            "OPENAI_BASE_URL": target.openai_base_url,
            "OPENAI_API_KEY": target.api_key,
            "OPENAI_MODEL": target.model,
            "QWEN_CODE_SUPPRESS_YOLO_WARNING": "1",  # headless yolo is what a sandboxed rollout wants
        }
        notes = ["Qwen Code's system prompt and tools take about 12k tokens; a small model's context may not "
                 "hold them."]
        return ScaffoldSetup(env=env, files={".qwen/settings.json": json.dumps(settings, indent=2)}, notes=notes)

    def command(self, task: str) -> list[str]:
        # The task as its positional prompt (``-p`` is deprecated; after ``--`` it is not read).
        return [self.executable, task, "--approval-mode", "yolo", "--output-format", "json"]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        if not headers.get("user-agent", "").startswith(USER_AGENT):
            return None
        return MAIN if body.get("tools") else CallPurpose("side", branch="side")
