"""Cline (the `cline` CLI, npm ``cline``), which speaks OpenAI Chat Completions.

What it sends (version 3.0.65, observed against arborl). The CLI is a Bun binary built on the AI
SDK: with the ``openai-compatible`` provider every call is a streaming
``POST {baseUrl}/chat/completions`` with ``tools``, ``tool_choice: "auto"`` and
``stream_options.include_usage``, and no ``max_tokens`` or sampling parameters. Its only headers
of its own are ``User-Agent: ai-sdk/openai-compatible/3.0.37 ai-sdk/provider-utils/5.0.30
runtime/bun/1.3.13`` and those the provider settings add, so `setup` adds ``X-Title: Cline`` and
``HTTP-Referer: https://cline.bot`` (what Cline's editor extension sends to OpenRouter) to every
call, sub-agents' and compaction's included. It makes no other request to the gateway.

- Tools are native function calls, not the XML tool prompt of the older Cline extension:
  read_files, search_codebase, run_commands, fetch_web_content, editor, ask_question,
  spawn_agent and 18 ``team_*`` tools (about 5.7k prompt tokens with the system prompt). The
  system prompt starts "You are Cline, an AI coding agent" and names the working directory
  ("Working Directory: /path"); the task is the user message, as given. A reply without tool
  calls ends the run. Tool results are JSON strings (``{"query", "result", "success"}``; a failed
  call has ``"error"``, a failed command ``"success": false``); ``ask_question`` answers itself
  with its first option when headless.
- History comes back faithfully: tool-call ids and argument strings as sampled, empty content as
  ``null``, ``reasoning_content`` with each assistant turn, so every main call stitches onto the
  previous one.
- A sub-agent (``spawn_agent``) runs in the same process with the same provider settings: its
  system prompt is the ``systemPrompt`` argument the policy wrote, its first user message the
  ``task``, and it has the seven base tools but no ``team_*`` ones.
- Context compaction (the default "agentic" mode, when a call nears the model's context
  window) is a call without tools whose system prompt is "Summarize the provided coding session
  into a concise continuation note ..." and whose user message starts "Summarize this session for
  continuation."; the main agent then goes on from [user "Context summary: ...", the turns it
  kept], a new branch of the main trie. Cline makes no title call.

Cline's own background traffic is switched off by `setup`: no hub daemon (it would otherwise
spawn a detached ``cline --cline-hub-daemon`` that outlives the run, in its own process group),
no update check, no telemetry (OpenTelemetry to otel.cline.bot, PostHog to data.cline.bot), no
PostHog feature-flag poll. No account login is involved: the provider is configured by file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from .base import MAIN, CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup
from .request_text import first_message_text

PROVIDER = "openai-compatible"  # what `cline auth -p openai -b URL` stores the provider as
SETTINGS = ".cline/data/settings"  # under HOME (Cline's --config / CLINE_DIR default ~/.cline)
# Every call carries these (they are the provider settings' extra headers); X-Title is how
# call_purpose knows the call is Cline's, since its user agent is the AI SDK's.
HEADERS = {"HTTP-Referer": "https://cline.bot", "X-Title": "Cline"}

_MAIN_PROMPT = "You are Cline"
_COMPACTION_PROMPTS = (
    "Summarize the provided coding session",  # the summarizer's system prompt
    "Summarize this session for continuation",  # its user message
)
_WHITESPACE = re.compile(r"\s")


class ClineAdapter(ScaffoldAdapter):
    name = "cline"
    executable = "cline"
    npm_package = "cline"
    tested_version = "3.0.65"
    dialect = "chat"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        # What `cline auth -p openai -b URL -k KEY -m MODEL` writes, plus the headers.
        providers = {
            "version": 1,
            "lastUsedProvider": PROVIDER,
            "modes": {},
            "providers": {
                PROVIDER: {
                    "settings": {
                        "provider": PROVIDER,
                        "apiKey": target.api_key,
                        "model": target.model,
                        "baseUrl": target.openai_base_url,
                        "headers": HEADERS,
                    },
                    "updatedAt": "2026-01-01T00:00:00.000Z",
                    "tokenSource": "manual",
                }
            },
        }
        # Read by every run; telemetryOptOut turns off both OpenTelemetry and PostHog events.
        global_settings = {"telemetryOptOut": True, "autoUpdateEnabled": False}
        files = {
            f"{SETTINGS}/providers.json": json.dumps(providers, indent=2) + "\n",
            f"{SETTINGS}/global-settings.json": json.dumps(global_settings, indent=2) + "\n",
        }
        env = {
            # Run the agent in this process. The default ("auto") looks for a hub daemon and,
            # finding none, starts one detached (its own session, so killing the run's process
            # group leaves it behind) for later runs to share.
            "CLINE_SESSION_BACKEND_MODE": "local",
            "CLINE_NO_AUTO_UPDATE": "1",
            # In 3.0.65 the only switch for the PostHog feature-flag poll (data.cline.bot), which
            # telemetryOptOut leaves on; nothing else in the CLI reads it.
            "E2E_TEST": "true",
        }
        notes = [
            (
                "Run `cline` with stdin from /dev/null or a terminal: from a pipe it is read to its end "
                "(the run waits for that) and appended to the task."
            ),
            (
                'Cline knows no context window for the served model; add "contextWindow": N (and '
                f'"maxTokens": M) to providers.{PROVIDER}.settings in ~/{SETTINGS}/providers.json so it '
                "compacts in time."
            ),
            (
                "Its tool list includes 18 team_* tools (about 2.5k tokens); list the unwanted ones under "
                f'"disabledTools" in ~/{SETTINGS}/global-settings.json for a small-context model.'
            ),
        ]
        return ScaffoldSetup(env=env, files=files, notes=notes)

    def command(self, task: str) -> list[str]:
        # Cline refuses a prompt without whitespace ("Unknown command or unquoted prompt") and
        # trims the prompt, so a one-word task gets a newline. "--" keeps a task that starts
        # with "-" the prompt. --json prints one JSON event per line, ending with a
        # {"type": "run_result", "finishReason": ...} line; the exit status is 0 even when the
        # run was aborted, so a caller reads finishReason ("completed" on success).
        if not _WHITESPACE.search(task):
            task += "\n"
        return [self.executable, "--json", "--auto-approve", "true", "--", task]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        tagged = headers.get("x-title", "").strip().lower() == "cline"
        if not tagged and not headers.get("user-agent", "").startswith("ai-sdk/"):
            return None
        system, user = first_message_text(body, ("system",)), first_message_text(body, ("user",))
        if system.startswith(_COMPACTION_PROMPTS) or user.startswith(_COMPACTION_PROMPTS):
            return CallPurpose("side", branch="compaction")
        if system.startswith(_MAIN_PROMPT) or "team_spawn_teammate" in _tool_names(body):
            return MAIN
        if not tagged:
            return None  # an AI SDK client, but nothing says it is Cline
        if body.get("tools"):
            # A sub-agent: its system prompt and task are what the policy passed to spawn_agent,
            # and they stay the same for all of its calls.
            key = hashlib.sha256(f"{system}\0{user}".encode()).hexdigest()[:12]
            return CallPurpose("subagent", branch=f"agent-{key}")
        return MAIN


def _tool_names(body: Mapping[str, Any]) -> set[str]:
    names = set()
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names
