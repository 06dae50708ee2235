"""OpenCode (`opencode run`), which speaks OpenAI Chat Completions through ``@ai-sdk/openai-compatible``,
and its fork Kilo Code (`kilo run`).

What it sends (version 1.18.33, observed against arborl): every call is a streaming
``POST {baseURL}/chat/completions`` with ``stream_options.include_usage``, ``max_tokens`` 32000
(its default output cap for a model it has no limits for) and no sampling parameters, and the
headers ``User-Agent: opencode/1.18.33 ai-sdk/provider-utils/... runtime/bun/...``,
``X-Session-Id`` and ``x-session-affinity`` (both OpenCode's own ``ses_...`` session id). It
makes no other request to the gateway (no ``/v1/models``).

- Main calls carry its tools (bash, edit, glob, grep, read, skill, task, todowrite, webfetch,
  write) with ``tool_choice: "auto"``; the system prompt starts "You are opencode, an
  interactive CLI tool". The task arrives as the user message wrapped in double quotes, inner
  quotes backslash-escaped (``run`` quotes every argument that contains a space). History comes
  back faithfully: tool-call ids and argument strings as sampled, ``reasoning_content`` with each
  assistant turn, so every main call stitches onto the previous one.
- The title call runs alongside the first main call, on the ``small_model``: no tools, a system
  message "You are a title generator. You output ONLY a thread title. ...", then the user
  messages "Generate a title for this conversation:\\n" and the quoted task.
- A sub-agent (the ``task`` tool) is a child session: its calls send the child's id in
  ``X-Session-Id`` plus ``x-parent-session-id``, and lack the ``task`` tool.
- Context compaction (only when the model entry has a ``limit.context`` and a call's usage nears
  it) is a call without tools whose system message is "You are a context summarization agent.
  ..." and whose user message holds the conversation as text; the main agent then starts over
  from [user "What did we do so far?", assistant <summary>, user "Continue if you have next
  steps, ..."], a new branch of the main trie. The session summary ("Summarize what was done in
  this conversation.") is a side call too; ``run`` never made one in these tests.

OpenCode repairs a call to an unknown tool before sending the history back: the name is
lower-cased when that names a tool, and otherwise the call is replaced by one to its
``invalid`` tool (arguments ``{"tool": ..., "error": ...}``). Those turns then differ from what
the policy sampled, and the next call branches from its path (``history_edited``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import MAIN, CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup
from .request_text import first_message_text

PROVIDER = "arborl"  # the provider id in opencode.json: models are named "arborl/<model>"

# How each of OpenCode's built-in auxiliary agents begins its system prompt.
_TITLE_PROMPT = "You are a title generator"
_SIDE_PROMPTS = {
    "You are a context summarization agent": "compaction",
    "Summarize what was done in this conversation": "summary",
}


class OpenCodeAdapter(ScaffoldAdapter):
    name = "opencode"
    executable = "opencode"
    npm_package = "opencode-ai"
    tested_version = "1.18.33"
    names_its_session = "X-Session-Id"
    dialect = "chat"
    # What a fork (Kilo Code) renames: where its configuration lives, its plugin package, the
    # prefix of its environment switches, how its requests introduce themselves.
    config_dir = ".config/opencode"
    config_file = "opencode.json"
    config_schema = "https://opencode.ai/config.json"
    plugin_package = "@opencode-ai/plugin"
    env_prefix = "OPENCODE"
    user_agent = "opencode/"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        model = f"{PROVIDER}/{target.model}"
        config = {
            "$schema": self.config_schema,
            "provider": {
                PROVIDER: {
                    "npm": "@ai-sdk/openai-compatible",  # bundled in the binary, nothing to install
                    "name": "arborl",
                    "options": {"baseURL": target.openai_base_url, "apiKey": target.api_key},
                    "models": {target.model: {"name": target.model}},
                }
            },
            # Only the served policy: no built-in provider is loaded, and the title and other
            # small-model calls name the same model rather than one arborl lacks.
            "enabled_providers": [PROVIDER],
            "model": model,
            "small_model": model,
            "permission": "allow",  # headless: every tool runs without asking
            "autoupdate": False,
            "share": "disabled",
            # No git snapshot of the work tree before each step: undo is never used headless,
            # and in a large repository the snapshot costs more than the step.
            "snapshot": False,
        }
        # OpenCode installs its plugin package with npm into every config directory on start
        # (in the background; it needs the registry) unless node_modules exists and the lock
        # file already lists the package. These two files satisfy that check.
        lock = {"lockfileVersion": 3, "packages": {"": {"dependencies": {self.plugin_package: "*"}}}}
        folder = self.config_dir
        files = {
            f"{folder}/{self.config_file}": json.dumps(config, indent=2) + "\n",
            f"{folder}/package-lock.json": json.dumps(lock, indent=2) + "\n",
            f"{folder}/node_modules/.arborl": "the plugin install at start is skipped (see package-lock.json)\n",
        }
        env = {f"{self.env_prefix}_{switch}": "1" for switch in (
            "DISABLE_AUTOUPDATE",
            "DISABLE_MODELS_FETCH",  # no models.dev catalogue download
            "DISABLE_SHARE",
            "DISABLE_LSP_DOWNLOAD",
            "DISABLE_DEFAULT_PLUGINS",
            "PURE",  # no plugins a project's config names (they would be fetched from npm)
        )}
        notes = [
            (
                "Run `opencode run` with stdin closed or redirected (< /dev/null): when stdin is not a "
                "terminal it reads it to the end and appends it to the task."
            ),
            (
                "OpenCode knows no context window for the served model, so it never compacts; add "
                f'"limit": {{"context": N, "output": M}} to the model under provider.{PROVIDER}.models in '
                f"~/{folder}/{self.config_file} to have it compact in time."
            ),
        ]
        return ScaffoldSetup(env=env, files=files, notes=notes)

    def command(self, task: str) -> list[str]:
        # The model comes from opencode.json. "--" keeps a task that starts with "-" a message;
        # --auto approves what the configuration does not explicitly deny (a project's own
        # opencode.json may ask for confirmation, which nobody is there to give).
        return [self.executable, "run", "--format", "json", "--auto", "--", task]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        if not headers.get("user-agent", "").startswith(self.user_agent):
            return None
        system = first_message_text(body, ("system", "developer"))
        if system.startswith(_TITLE_PROMPT):
            return CallPurpose("title", branch="title")
        for prompt, branch in _SIDE_PROMPTS.items():
            if system.startswith(prompt):
                return CallPurpose("side", branch=branch)
        if "x-parent-session-id" in headers:
            return CallPurpose("subagent", branch=f"agent-{headers.get('x-session-id', 'unknown')}")
        return MAIN



class KiloCodeAdapter(OpenCodeAdapter):
    """Kilo Code's CLI (`kilo run`), a fork of OpenCode: the same configuration, tools, headless run
    and auxiliary calls, under its own names.

    What it sends (version 7.7.7, observed against arborl; 7.8.x publishes no linux-x64 binary to
    the registry this was built against): streaming Chat Completions with
    ``User-Agent: Kilo-Code/7.7.7 ai-sdk/provider-utils/... runtime/bun/...``, ``X-Title: Kilo Code``,
    ``HTTP-Referer: https://kilocode.ai``, and ``X-Session-Id`` / ``x-session-affinity`` (its
    ``ses_...`` id; ``title-ses_...`` on the title call). The system prompt starts "You are Kilo,
    a highly skilled software engineer"; it offers 16 tools (bash, edit, glob, grep, read, write,
    ...). The title call comes after the main loop's calls, with OpenCode's title prompt.
    """

    name = "kilocode"
    executable = "kilo"
    npm_package = "@kilocode/cli"
    tested_version = "7.7.7"
    config_dir = ".config/kilo"
    config_file = "kilo.json"
    config_schema = "https://app.kilo.ai/config.json"
    plugin_package = "@kilocode/plugin"
    env_prefix = "KILO"
    user_agent = "Kilo-Code/"
