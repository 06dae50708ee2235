"""What the Codex adapter writes for Codex CLI, and how it sorts the calls Codex makes."""

from __future__ import annotations

import json
import tomllib

from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.codex import API_KEY_ENV, CodexAdapter
from arborl.scaffold_adapters.registry import call_purpose

TARGET = GatewayTarget("http://127.0.0.1:8000/", "sk-test", 'pol"icy', session_id="run-7")
THREAD = "01a20a49-ac79-76d3-b09f-dae62e575d38"


def codex_headers(**metadata) -> dict[str, str]:
    """The headers codex_exec 0.169.0 sends, with the turn metadata it sends (abridged)."""
    turn = {
        "session_id": THREAD,
        "thread_id": THREAD,
        "agent_name": "/root",
        "request_kind": "turn",
        **metadata,
    }
    return {
        "originator": "codex_exec",
        "user-agent": "codex_exec/0.169.0 (Debian 12.0.0; x86_64) unknown",
        "session-id": THREAD,
        "thread-id": THREAD,
        "x-codex-turn-metadata": json.dumps(turn),
    }


def test_config_points_codex_at_the_gateway():
    setup = CodexAdapter().setup(TARGET)
    config = tomllib.loads(setup.files[".codex/config.toml"])
    provider = config["model_providers"][config["model_provider"]]
    assert config["model"] == 'pol"icy'
    assert provider["base_url"] == "http://127.0.0.1:8000/s/run-7/v1" and provider["wire_api"] == "responses"
    assert setup.env == {provider["env_key"]: "sk-test"} and provider["env_key"] == API_KEY_ENV
    assert (
        config["features"]["plugins"] is False and config["features"]["unbounded_connection_retries"] is False
    )


def test_command_runs_the_task_headless_after_the_options():
    command = CodexAdapter().command("-x: fix the bug")
    assert command[:2] == ["codex", "exec"] and command[-2:] == ["--", "-x: fix the bug"]
    assert "--dangerously-bypass-approvals-and-sandbox" in command and "--json" in command


def test_main_loop_and_compaction():
    assert call_purpose(codex_headers(), {"tools": [{}]}).kind == "main"
    compaction = call_purpose(codex_headers(request_kind="compaction"), {})
    assert (compaction.kind, compaction.branch) == ("side", "compaction")


def test_metadata_is_read_from_client_metadata_without_the_header():
    headers = codex_headers(request_kind="compaction")
    body = {"client_metadata": {"x-codex-turn-metadata": headers.pop("x-codex-turn-metadata")}}
    assert call_purpose(headers, body).branch == "compaction"


def test_subagents_get_a_trie_per_thread_and_housekeeping_is_side():
    review = {
        **codex_headers(thread_id="child-1", subagent_kind="review", parent_thread_id=THREAD),
        "x-openai-subagent": "review",
        "x-codex-parent-thread-id": THREAD,
    }
    purpose = call_purpose(review, {})
    assert (purpose.kind, purpose.branch) == ("subagent", "agent-child-1")
    memory = call_purpose({**codex_headers(), "x-openai-subagent": "memory_consolidation"}, {})
    assert (memory.kind, memory.branch) == ("side", "memory_consolidation")


def test_other_clients_are_not_codex():
    assert CodexAdapter().call_purpose({"user-agent": "OpenAI/Python 1.99"}, {"tools": []}) is None
