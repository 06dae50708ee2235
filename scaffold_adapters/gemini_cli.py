"""Gemini CLI (`gemini -p`), which speaks the Gemini API (``streamGenerateContent?alt=sse``).

What it sends (version 0.61.0, observed against arborl): every call of its agent loop is
``POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`` with the key in
``x-goog-api-key``, ``User-Agent: GeminiCLI-tui/0.61.0/{model} (linux; x64; terminal)`` and
``x-goog-api-client: google-genai-sdk/...``; the body has ``systemInstruction`` (about 30k
characters), its 15 tools as ``functionDeclarations`` with ``parametersJsonSchema``, and
``generationConfig`` {temperature 1, topP 0.95, topK 64, thinkingConfig.includeThoughts}. The
first user turn is two text parts: a ``<session_context>`` block (date, OS, workspace listing)
and the task. It sends no session id of its own (its ``session_id`` stays in its JSON output):
give each run a ``/s/{session}`` base URL, as the orchestrator does.

- History comes back as it was served: text parts, ``functionCall`` parts with the ``id`` the
  gateway gave them (a call without one gets ``{name}_{time}_{n}``) and a
  ``thoughtSignature`` the CLI adds, then a user turn of ``functionResponse`` parts, so every
  call stitches onto the previous one. A tool's result is ``{"output": ...}``; a failed shell
  command is ``{"output": "...Exit Code: 1..."}`` and a tool that failed to run is
  ``{"error": ...}`` (the gateway renders that as ``Error: ...``).
- Its utility calls (loop detection, next-speaker check, summaries, the model-router classifier,
  chat compression) go to the model named by its internal aliases (``flash-lite`` and so on),
  not the one given with ``-m``. They ask for JSON (``responseMimeType``/``responseJsonSchema``)
  or carry no tools: they are side calls, filed in the session's ``side`` trie. A headless run
  of a short task made none in these tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import MAIN, CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup

USER_AGENT = "GeminiCLI"


class GeminiCliAdapter(ScaffoldAdapter):
    name = "gemini-cli"
    executable = "gemini"
    npm_package = "@google/gemini-cli"
    tested_version = "0.61.0"
    names_its_session = None
    dialect = "gemini"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        settings = {
            "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
            "model": {"name": target.model},
            "privacy": {"usageStatisticsEnabled": False},
            "telemetry": {"enabled": False},
            "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False,
                        "checkpointing": {"enabled": False}},
        }
        env = {
            "GOOGLE_GEMINI_BASE_URL": target.root,  # the SDK appends /v1beta/models/...
            "GEMINI_API_KEY": target.api_key,
            "GEMINI_MODEL": target.model,
            "GEMINI_CLI_TRUST_WORKSPACE": "true",  # headless in any folder (a sandbox's workspace)
        }
        notes = [
            "Gemini CLI's system prompt and tools take about 12k tokens; a small model's context may not hold them.",
            "Its utility calls (loop detection, summaries) name Google's flash-lite model: add that name to "
            "gateway.model_aliases, or set gateway.any_model_name, if you want them answered.",
        ]
        return ScaffoldSetup(env=env, files={".gemini/settings.json": json.dumps(settings, indent=2)}, notes=notes)

    def command(self, task: str) -> list[str]:
        return [self.executable, "-p", task, "--approval-mode", "yolo", "--output-format", "json"]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        if not headers.get("user-agent", "").startswith(USER_AGENT):
            return None
        config = body.get("generationConfig") or body.get("generation_config") or {}
        asks_for_json = isinstance(config, Mapping) and any(
            key in config for key in ("responseMimeType", "responseJsonSchema", "responseSchema",
                                      "response_mime_type", "response_json_schema", "response_schema"))
        if asks_for_json or not body.get("tools"):
            return CallPurpose("side", branch="side")
        return MAIN
