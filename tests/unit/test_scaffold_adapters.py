"""What each scaffold adapter tells its agent, and how it sorts the agent's calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from arborl.scaffold_adapters.base import CallPurpose, GatewayTarget, ScaffoldSetup
from arborl.scaffold_adapters.registry import ADAPTERS, call_purpose, get_adapter

TARGET = GatewayTarget("http://127.0.0.1:8000/", "sk-test", "policy", session_id="run-7")


def test_target_routes_through_the_session_prefix():
    assert TARGET.root == "http://127.0.0.1:8000/s/run-7"
    assert TARGET.openai_base_url == "http://127.0.0.1:8000/s/run-7/v1"
    assert GatewayTarget("http://h:1", "k", "m").openai_base_url == "http://h:1/v1"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_points_its_agent_at_the_gateway(name: str, tmp_path: Path):
    adapter = get_adapter(name)
    setup = adapter.setup(TARGET)
    written = setup.write(tmp_path)
    text = "\n".join(setup.env.values()) + "\n".join(p.read_text() for p in written)
    assert TARGET.root in text and "sk-test" in text and "policy" in text
    assert adapter.command("fix the bug")[0] == adapter.executable
    assert "fix the bug" in adapter.command("fix the bug")


def test_claude_code_names_the_policy_in_every_model_slot():
    env = get_adapter("claude-code").setup(TARGET).env
    assert env["ANTHROPIC_BASE_URL"] == TARGET.root and env["ANTHROPIC_AUTH_TOKEN"] == "sk-test"
    assert {env[k] for k in env if k.endswith("_MODEL")} == {"policy"}


def test_shell_exports_quote_values():
    assert ScaffoldSetup(env={"A": "x y'z"}).shell_exports() == "export A='x y'\"'\"'z'"


def test_unknown_scaffold_names_the_known_ones():
    with pytest.raises(KeyError, match="claude-code"):
        get_adapter("emacs")


def test_claude_code_calls_are_sorted_by_purpose():
    headers = {"x-claude-code-session-id": "s"}
    title = {"output_config": {"format": {"type": "json_schema", "schema": {"properties": {"title": {}}}}}}
    assert call_purpose(headers, title).kind == "title"
    assert call_purpose({**headers, "x-claude-code-agent-id": "a/1"}, {"tools": [{}]}).branch == "agent-a/1"
    assert call_purpose(headers, {"tools": [{"name": "Bash"}], **title}).kind == "main"  # tools: the main loop
    assert call_purpose({}, title).kind == "main"  # not Claude Code's
    quota = {"max_tokens": 1, "messages": [{"role": "user", "content": "quota"}]}
    assert call_purpose(headers, quota) == CallPurpose("side", branch="side")
    history = {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash",
                                                               "input": {}}]}]}
    assert call_purpose(headers, history).kind == "main"  # a compaction of the agent's history


def test_gemini_cli_points_the_sdk_at_the_session_root():
    setup = get_adapter("gemini-cli").setup(TARGET)
    assert setup.env["GOOGLE_GEMINI_BASE_URL"] == TARGET.root  # the SDK appends /v1beta/models/...
    assert setup.env["GEMINI_API_KEY"] == "sk-test" and setup.env["GEMINI_MODEL"] == "policy"


def test_gemini_cli_calls_are_sorted_by_purpose():
    agent = {"user-agent": "GeminiCLI-tui/0.61.0/policy (linux; x64; terminal)"}
    tools = {"tools": [{"functionDeclarations": [{"name": "run_shell_command"}]}]}
    assert call_purpose(agent, tools).kind == "main"
    # utility calls: JSON answers (loop detection, next speaker, the router's classifier), or no tools
    json_answer = {**tools, "generationConfig": {"responseMimeType": "application/json", "responseJsonSchema": {}}}
    assert call_purpose(agent, json_answer) == CallPurpose("side", branch="side")
    assert call_purpose(agent, {"contents": [{"role": "user", "parts": [{"text": "summarise"}]}]}).kind == "side"
    assert call_purpose({"user-agent": "google-genai-sdk/1.30.0"}, {}).kind == "main"  # not Gemini CLI's


def test_aider_side_calls_are_known_by_their_prompts():
    def body(system: str) -> dict:
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}]}

    commit = body("You are an expert software engineer that generates concise, one-line Git commit messages based")
    assert call_purpose({}, commit) == CallPurpose("side", branch="commit")
    summary = body("*Briefly* summarize this partial conversation about programming.\\nInclude less detail")
    assert call_purpose({}, summary) == CallPurpose("side", branch="summary")
    assert call_purpose({}, body("Act as an expert software developer.")).kind == "main"


def test_a_cli_that_needs_more_address_space_gets_its_floor():
    from arborl.rollout.agent_runs import min_memory_mb

    assert min_memory_mb("openclaw") == 8192  # its Node worker threads reserve ~600 MiB each
    assert min_memory_mb("claude-code") == 0 and min_memory_mb("builtin") == 0
