"""mini-swe-agent's adapter: the environment it sets, its command, and that it claims no calls.

The request shapes below are the ones mini-swe-agent 2.4.6 (litellm 1.105.3) sent to arborl
(tests/e2e/test_mini_swe_agent.py runs the real CLI).
"""

from __future__ import annotations

from pathlib import Path

from arborl.scaffold_adapters.base import MAIN, GatewayTarget
from arborl.scaffold_adapters.mini_swe_agent import DEFAULT_STEP_LIMIT, MiniSweAgentAdapter
from arborl.scaffold_adapters.registry import ADAPTERS, call_purpose, get_adapter

TARGET = GatewayTarget("http://127.0.0.1:8000/", "sk-test", "policy", session_id="run-7")
HEADERS = {"user-agent": "OpenAI/Python 2.54.0", "x-stainless-lang": "python", "authorization": "Bearer x"}
BASH = {"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}


def test_setup_points_litellm_at_the_gateway_and_keeps_mini_headless(tmp_path: Path):
    setup = MiniSweAgentAdapter().setup(TARGET)
    env = setup.env
    assert env["MSWEA_MODEL_NAME"] == "openai/policy"  # litellm's OpenAI-compatible provider
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8000/s/run-7/v1" and env["OPENAI_API_KEY"] == "sk-test"
    assert env["MSWEA_CONFIGURED"] == "true"  # no setup wizard asking on the terminal
    assert env["MSWEA_COST_TRACKING"] == "ignore_errors"  # an unpriced model does not abort the run
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"  # no price-list download at import
    # Everything is in the environment: nothing is written into HOME, so nothing names it.
    assert setup.files == {} and setup.write(tmp_path) == [] and not any(tmp_path.iterdir())
    assert any("litellm==" in note for note in setup.notes)


def test_a_served_model_name_with_a_slash_keeps_it():
    target = GatewayTarget("http://h:1", "k", "Qwen/Qwen3-8B")
    env = MiniSweAgentAdapter().setup(target).env
    assert env["MSWEA_MODEL_NAME"] == "openai/Qwen/Qwen3-8B" and env["OPENAI_BASE_URL"] == "http://h:1/v1"


def test_command_runs_the_task_headless_with_a_step_limit():
    command = MiniSweAgentAdapter().command("-v is broken; fix it")
    assert command[0] == "mini"
    assert "-y" in command and "--exit-immediately" in command  # yolo, and no "new task?" prompt at the end
    assert command[command.index("-l") + 1] == "0"  # no cost limit
    configs = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    # The default config, then the step limit merged over it.
    assert configs == ["mini.yaml", f"agent.step_limit={DEFAULT_STEP_LIMIT}"]
    assert command[-2:] == ["-t", "-v is broken; fix it"]  # "-t" takes the next argument, "-" or not
    assert "agent.step_limit=7" in MiniSweAgentAdapter(step_limit=7).command("x")


def test_registry_knows_mini_swe_agent_and_how_it_is_installed():
    adapter = get_adapter("mini-swe-agent")
    assert isinstance(adapter, MiniSweAgentAdapter) and ADAPTERS["mini-swe-agent"] is adapter
    assert adapter.executable == "mini" and adapter.dialect == "chat"
    assert adapter.pypi_package == "mini-swe-agent" and adapter.npm_package is None
    # No other scaffold installs the same distribution (aider is the other one from PyPI).
    others = {other.pypi_package for name, other in ADAPTERS.items() if name != "mini-swe-agent"}
    assert "mini-swe-agent" not in others and others - {None} == {"aider-chat"}


def test_mini_makes_no_auxiliary_calls():
    body = {
        "model": "policy",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant that can interact with a computer."},
            {"role": "user", "content": "Please solve this issue: fix the bug"},
        ],
        "tools": [BASH],
    }
    assert MiniSweAgentAdapter().call_purpose(HEADERS, body) is None  # nothing to tell it apart
    assert call_purpose(HEADERS, body) == MAIN
    # A call after a format error ("Tool call error: ...") is still the agent's main loop.
    error = {"role": "user", "content": "Tool call error:\n\n<error>"}
    retry = {**body, "messages": [*body["messages"], error]}
    assert call_purpose(HEADERS, retry) == MAIN
