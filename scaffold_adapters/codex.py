"""OpenAI Codex CLI (`codex exec`), which speaks OpenAI Responses only.

Pinned and observed against arborl: @openai/codex 0.169.0.

What it sends: every model call is ``POST {base_url}/responses`` with ``stream: true``,
``store: false``, the whole conversation in ``input`` (developer messages for its prompt, a
user ``<environment_context>`` message naming ``<cwd>``, then the task), ``include:
["reasoning.encrypted_content"]``, ``prompt_cache_key`` and ``client_metadata`` (its
``session_id`` and ``thread_id``, the thread's UUIDv7). The headers are ``originator:
codex_exec``, ``user-agent: codex_exec/<version> ...``, ``session-id``, ``thread-id``,
``x-codex-window-id`` (``<thread>:<n>``, n counts compactions) and ``x-codex-turn-metadata``,
a JSON object whose ``request_kind`` is ``"turn"`` for the agent loop. It re-sends earlier
output items as it received them: reasoning items (with ``content`` and ``encrypted_content:
null``), message items, every ``function_call`` item and then the ``function_call_output``
items (a string: chunk id, wall time, exit code, then the command's output).

For a model it has no metadata for, Codex falls back to generic metadata (and warns about it
once per run): its tools are ``exec_command`` (``{"cmd": ..., "workdir": ...}``),
``write_stdin``, ``request_user_input``, ``view_image`` and the goal tools as functions, plus a
``namespace`` of multi-agent tools and ``web_search``, which arborl does not serve (only function
tools are). There is no ``apply_patch`` tool then: the model edits files through the shell.

Auxiliary calls, seen in its traffic:
- compaction (when the context passes ``model_auto_compact_token_limit``): the same endpoint,
  no tools, ``request_kind: "compaction"`` and a last user message asking for a handoff
  summary; the next main call starts a new window whose history holds that summary, so the
  main path branches there (``history_edited``), as DESIGN says a compaction should;
- sub-agents (``codex exec review`` runs its reviewer as one): ``x-openai-subagent: review``,
  ``x-codex-parent-thread-id`` and their own ``thread_id`` (and ``subagent_kind``) in the turn
  metadata. Spawned workers (``thread_spawn``) and Codex's internal helpers
  (``memory_consolidation``, ``guardian``: bookkeeping) were not observed, only read from the
  binary's labels: spawning needs the multi-agent tools, which arborl does not serve, and the
  helpers need features that are off by default.

Without ``features.plugins = false`` every start runs ``git ls-remote`` on
github.com/openai/plugins and looks up api.github.com and chatgpt.com; nothing else leaves the
machine in ``exec`` (checked with strace). With ``unbounded_connection_retries`` on (its default),
an unreachable gateway makes Codex retry forever instead of failing the run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import MAIN, CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup

TESTED_VERSION = "0.169.0"
PROVIDER = "arborl"
API_KEY_ENV = "ARBORL_API_KEY"

# Sub-agent kinds (``x-openai-subagent``) that are Codex's own housekeeping, not the policy at work.
_HOUSEKEEPING = frozenset({"memory_consolidation", "guardian"})


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(value, ensure_ascii=False)


class CodexAdapter(ScaffoldAdapter):
    name = "codex"
    executable = "codex"
    npm_package = "@openai/codex"
    tested_version = TESTED_VERSION
    names_its_session = "client_metadata.session_id"
    dialect = "responses"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        config = f"""\
# Written by arborl: Codex CLI -> the arborl gateway at {target.root}
model = {_toml_string(target.model)}
model_provider = "{PROVIDER}"
check_for_update_on_startup = false
# A hosted tool: arborl serves function tools only.
web_search = "disabled"

[model_providers.{PROVIDER}]
name = "arborl"
base_url = {_toml_string(target.openai_base_url)}
env_key = "{API_KEY_ENV}"
wire_api = "responses"

[analytics]
enabled = false

[features]
# The plugin marketplace syncs from github.com and chatgpt.com on every start.
plugins = false
remote_plugin = false
apps = false
# Otherwise Codex retries an unreachable gateway forever instead of failing the run.
unbounded_connection_retries = false
"""
        notes = [
            (
                f"Tested with {self.npm_package}@{TESTED_VERSION}. The config replaces ~/.codex/config.toml; "
                "set CODEX_HOME to another folder holding it to keep your own."
            ),
            (
                "`codex exec` appends piped stdin to the task and waits for its end: run it with stdin "
                "closed (< /dev/null) when it is not a terminal."
            ),
            (
                "Codex has no metadata for the served model, so it warns once and uses generic defaults (no "
                "apply_patch tool, a large assumed context). Set model_context_window and "
                "model_auto_compact_token_limit in the config to the served context so it compacts in time."
            ),
        ]
        return ScaffoldSetup(
            env={API_KEY_ENV: target.api_key}, files={".codex/config.toml": config}, notes=notes
        )

    def command(self, task: str) -> list[str]:
        """``--json`` prints the run as JSONL events (agent messages, commands, ``turn.completed``)."""
        return [
            self.executable,
            "exec",
            "--json",
            "--dangerously-bypass-approvals-and-sandbox",
            "--skip-git-repo-check",
            "--",
            task,
        ]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        if not _is_codex(headers):
            return None
        metadata = _turn_metadata(headers, body)
        subagent = headers.get("x-openai-subagent") or metadata.get("subagent_kind")
        if metadata.get("request_kind") == "compaction" or subagent == "compact":
            return CallPurpose("side", branch="compaction")
        if subagent:
            if subagent in _HOUSEKEEPING:
                return CallPurpose("side", branch=str(subagent))
            thread = metadata.get("thread_id") or headers.get("thread-id") or subagent
            return CallPurpose("subagent", branch=f"agent-{thread}")
        return MAIN


def _is_codex(headers: Mapping[str, str]) -> bool:
    originator = headers.get("originator", "")
    return originator.startswith("codex") or headers.get("user-agent", "").startswith("codex")


def _turn_metadata(headers: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
    """``x-codex-turn-metadata``, from the header or (a copy Codex also sends) ``client_metadata``."""
    raw = headers.get("x-codex-turn-metadata")
    if raw is None:
        client_metadata = body.get("client_metadata")
        raw = client_metadata.get("x-codex-turn-metadata") if isinstance(client_metadata, Mapping) else None
    if not isinstance(raw, str):
        return {}
    try:
        metadata = json.loads(raw)
    except ValueError:
        return {}
    return metadata if isinstance(metadata, dict) else {}
