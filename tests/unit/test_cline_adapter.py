"""Cline's adapter: the configuration it writes, its command, and how it sorts Cline's calls.

The request shapes below are the ones Cline 3.0.65 sent to arborl (tests/e2e/test_cline.py runs
the real CLI).
"""

from __future__ import annotations

import json
from pathlib import Path

from arborl.scaffold_adapters.base import MAIN, CallPurpose, GatewayTarget
from arborl.scaffold_adapters.cline import ClineAdapter
from arborl.scaffold_adapters.registry import call_purpose

TARGET = GatewayTarget("http://127.0.0.1:8000/", "sk-test", "policy", session_id="run-7")
USER_AGENT = "ai-sdk/openai-compatible/3.0.37 ai-sdk/provider-utils/5.0.30 runtime/bun/1.3.13"
HEADERS = {"user-agent": USER_AGENT, "x-title": "Cline", "http-referer": "https://cline.bot"}
MAIN_PROMPT = "You are Cline, an AI coding agent. Your primary goal is to assist users"


def _tools(*names: str) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]


BASE_TOOLS = _tools("read_files", "run_commands", "editor", "spawn_agent")
LEAD_TOOLS = BASE_TOOLS + _tools("team_spawn_teammate", "team_status")


def _body(system: str | list, user: str = "fix the bug", tools: list | None = None) -> dict:
    body = {
        "model": "policy",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "stream": True,
    }
    return {**body, "tools": tools, "tool_choice": "auto"} if tools else body


def test_setup_writes_what_cline_auth_writes_and_keeps_cline_offline(tmp_path: Path):
    setup = ClineAdapter().setup(TARGET)
    setup.write(tmp_path)
    providers = json.loads((tmp_path / ".cline/data/settings/providers.json").read_text())
    assert providers["version"] == 1 and providers["lastUsedProvider"] == "openai-compatible"
    settings = providers["providers"]["openai-compatible"]["settings"]
    assert settings["baseUrl"] == "http://127.0.0.1:8000/s/run-7/v1"
    assert settings["provider"] == "openai-compatible" and settings["apiKey"] == "sk-test"
    assert settings["model"] == "policy"
    assert settings["headers"]["X-Title"] == "Cline"
    global_settings = json.loads((tmp_path / ".cline/data/settings/global-settings.json").read_text())
    assert global_settings == {"telemetryOptOut": True, "autoUpdateEnabled": False}
    assert setup.env["CLINE_SESSION_BACKEND_MODE"] == "local"  # no detached hub daemon
    assert setup.env["CLINE_NO_AUTO_UPDATE"] == "1" and setup.env["E2E_TEST"] == "true"


def test_command_runs_the_task_headless_with_json_output():
    command = ClineAdapter().command("-v is broken; fix it")
    assert command[0] == "cline" and "--json" in command
    assert command[command.index("--auto-approve") + 1] == "true"
    assert command[-2:] == ["--", "-v is broken; fix it"]  # a task starting with "-" stays the prompt
    # Cline refuses a prompt without whitespace; it trims the newline that makes it acceptable.
    assert ClineAdapter().command("refactor")[-1] == "refactor\n"


def test_cline_calls_are_sorted_by_purpose():
    purpose = ClineAdapter().call_purpose
    assert purpose(HEADERS, _body(MAIN_PROMPT, tools=LEAD_TOOLS)) == MAIN
    assert purpose(HEADERS, _body("A custom --system prompt", tools=LEAD_TOOLS)) == MAIN
    compaction = _body(
        "Summarize the provided coding session into a concise continuation note with detailed next steps.",
        "Summarize this session for continuation. Be concise and factual.\n\n## Goal\n...",
    )
    assert purpose(HEADERS, compaction) == CallPurpose("side", branch="compaction")
    sub = purpose(HEADERS, _body("You are a helper.", "count the files", tools=BASE_TOOLS))
    assert sub is not None and sub.kind == "subagent" and sub.branch and sub.branch.startswith("agent-")
    # All of one sub-agent's calls go to one branch; another sub-agent gets its own.
    later = _body([{"type": "text", "text": "You are a helper."}], "count the files", tools=BASE_TOOLS)
    later["messages"].append({"role": "assistant", "content": "3"})
    assert purpose(HEADERS, later) == sub
    assert purpose(HEADERS, _body("You are a helper.", "list the files", tools=BASE_TOOLS)) != sub


def test_cline_without_the_adapters_headers_is_known_by_its_prompts():
    purpose, untagged = ClineAdapter().call_purpose, {"user-agent": USER_AGENT}
    assert purpose(untagged, _body(MAIN_PROMPT, tools=LEAD_TOOLS)) == MAIN
    assert purpose(untagged, _body("You are a helper.", tools=BASE_TOOLS)) is None  # some other AI SDK client
    assert purpose({"user-agent": "OpenAI/Python 1.0"}, _body(MAIN_PROMPT)) is None


def test_the_registry_sends_clines_compaction_to_its_own_trie():
    body = _body("Summarize the provided coding session into a concise continuation note.", "x")
    assert call_purpose(HEADERS, body) == CallPurpose("side", branch="compaction")
