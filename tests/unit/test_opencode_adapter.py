"""OpenCode's adapter: the configuration it writes, its command, and how it sorts OpenCode's calls.

The request shapes below are the ones OpenCode 1.18.33 sent to arborl (tests/e2e/test_opencode.py
runs the real CLI).
"""

from __future__ import annotations

import json
from pathlib import Path

from arborl.scaffold_adapters.base import MAIN, CallPurpose, GatewayTarget
from arborl.scaffold_adapters.opencode import OpenCodeAdapter

TARGET = GatewayTarget("http://127.0.0.1:8000/", "sk-test", "policy", session_id="run-7")
HEADERS = {
    "user-agent": "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14",
    "x-session-id": "ses_main",
    "x-session-affinity": "ses_main",
}
TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]


def _body(system: str | list, *, tools: bool = True) -> dict:
    body = {
        "model": "policy",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}],
    }
    return {**body, "tools": TOOLS} if tools else body


def test_setup_points_opencode_at_the_gateway_and_keeps_it_offline(tmp_path: Path):
    setup = OpenCodeAdapter().setup(TARGET)
    setup.write(tmp_path)
    config = json.loads((tmp_path / ".config/opencode/opencode.json").read_text())
    provider = config["provider"]["arborl"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": "http://127.0.0.1:8000/s/run-7/v1", "apiKey": "sk-test"}
    assert list(provider["models"]) == ["policy"]
    assert config["model"] == config["small_model"] == "arborl/policy"
    assert config["enabled_providers"] == ["arborl"] and config["permission"] == "allow"
    # OpenCode's start-up npm install of @opencode-ai/plugin finds it already "installed".
    lock = json.loads((tmp_path / ".config/opencode/package-lock.json").read_text())
    assert "@opencode-ai/plugin" in lock["packages"][""]["dependencies"]
    assert (tmp_path / ".config/opencode/node_modules").is_dir()
    for flag in ("OPENCODE_DISABLE_AUTOUPDATE", "OPENCODE_DISABLE_MODELS_FETCH", "OPENCODE_DISABLE_SHARE"):
        assert setup.env[flag] == "1"


def test_command_runs_the_task_headless():
    command = OpenCodeAdapter().command("-v is broken; fix it")
    assert command[:2] == ["opencode", "run"] and "--auto" in command
    assert command[-2:] == ["--", "-v is broken; fix it"]  # a task starting with "-" stays the message


def test_opencode_calls_are_sorted_by_purpose():
    purpose = OpenCodeAdapter().call_purpose
    title = _body("You are a title generator. You output ONLY a thread title. Nothing else.", tools=False)
    assert purpose(HEADERS, title) == CallPurpose("title", branch="title")
    assert purpose(HEADERS, _body("You are opencode, an interactive CLI tool that helps users")) == MAIN
    compaction = _body([{"type": "text", "text": "You are a context summarization agent. You are given"}])
    assert purpose(HEADERS, compaction) == CallPurpose("side", branch="compaction")
    summary = _body("Summarize what was done in this conversation. Write like a pull request description.")
    assert purpose(HEADERS, summary) == CallPurpose("side", branch="summary")
    child = {**HEADERS, "x-session-id": "ses_child", "x-parent-session-id": "ses_main"}
    assert purpose(child, _body("You are opencode, an interactive CLI tool")) == CallPurpose(
        "subagent", branch="agent-ses_child"
    )
    assert purpose({"user-agent": "OpenAI/Python 1.0"}, title) is None  # not OpenCode's
