"""The real OpenAI Codex CLI (`codex exec`) against a live arborl gateway.

A scripted engine plays the policy: in its first turn it writes two files with two parallel
``exec_command`` calls (text before the calls, whitespace between them, as a model writes
them), then reads one back with ``cat``, then answers. Codex must run the commands for real (the
files appear on disk, the command's output comes back in the next request), finish its turn
cleanly, and its calls must form one stitched path in the session's trie: Codex re-sends every
output item it was streamed, and each request must extend the previous call's exact tokens.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest

from agent_cli import run_cli, scripted_gateway
from arborl.gateway.tool_parsers import get_parser
from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.codex import CodexAdapter

HERMES = get_parser("hermes")
FINAL = "Done: hello.txt contains hi."


def write_then_cat(prompt: str) -> str:
    """Codex's environment context names the working directory; tool results count the steps."""
    if "<tools>" not in prompt:
        return "ok"  # a side call without tools (compaction)
    cwd = re.search(r"<cwd>([^<]+)</cwd>", prompt)
    step = prompt.count("<tool_response>")
    if cwd is None:
        return "no working directory in the prompt"
    if step == 0:
        return "I will create the files.\n" + "\n".join(
            HERMES.format_call("exec_command", {"cmd": cmd, "workdir": cwd.group(1)})
            for cmd in ("printf 'hi\\n' > hello.txt", "printf 'yo\\n' > other.txt")
        )
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 2:
        return HERMES.format_call("exec_command", {"cmd": "cat hello.txt"})
    # The answer is only right if the command's output really came back to the model.
    return FINAL if "hi" in last_result else f"the command's output did not come back: {last_result[:200]!r}"


@pytest.mark.e2e("codex")
def test_codex_runs_tools_through_arborl(tiny_model_dir: Path, tmp_path: Path):
    session = str(uuid.uuid4())
    adapter = CodexAdapter()
    with scripted_gateway(tiny_model_dir, tmp_path, write_then_cat) as gateway:
        store, work, home = gateway.store, gateway.work, gateway.home
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(home)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex"), **setup.env}
        command = adapter.command("create a file hello.txt containing hi")
        command[2:2] = ["--strict-config", "--ephemeral"]  # options go before the `--` that ends them
        done = run_cli(command, cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    messages = [
        e["item"]["text"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"
    ]
    assert messages[-1] == FINAL and events[-1]["type"] == "turn.completed", done.stdout
    commands = [
        e["item"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "command_execution"
    ]
    assert [c["exit_code"] for c in commands] == [0, 0, 0] and commands[-1]["aggregated_output"] == "hi\n"
    assert (work / "hello.txt").read_text() == "hi\n" and (work / "other.txt").read_text() == "yo\n"

    calls = store.calls(session)
    assert [c.status for c in calls] == ["ok"] * 3 and all(c.token_exact for c in calls)
    assert [c.purpose for c in calls] == ["main"] * 3
    assert [c.branch_reason for c in calls] == [None] * 3
    assert calls[1].stitched_from == calls[0].id and calls[2].stitched_from == calls[1].id
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in calls]
    assert [[t["name"] for t in turn] for turn in tool_calls[:2]] == [["exec_command"] * 2, ["exec_command"]]
    assert tool_calls[2] is None
    request = json.loads(store.call_bodies(calls[0].id)["request_body"])
    assert request["client_metadata"]["session_id"] and request["stream"] is True
    trie = store.trie(session)
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len  # one path
    store.close()


@pytest.mark.e2e("codex")
def test_a_prefill_longer_than_codexs_idle_timeout_is_waited_out(tiny_model_dir: Path, tmp_path: Path):
    """Codex gives up on a stream after ``stream_idle_timeout_ms`` without an event (300 s by
    default; an SSE comment does not count) and retries it from scratch. Here a reply is silent
    for 3 s against a 1 s idle timeout: the gateway's keep-alive events keep Codex waiting, and
    the one call is answered once, not cut and retried."""
    session = str(uuid.uuid4())
    adapter = CodexAdapter()
    with scripted_gateway(tiny_model_dir, tmp_path, lambda prompt: FINAL, first_token_delay_s=3.0,
                          stream_keepalive_s=0.25) as gateway:
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(gateway.home)
        config = gateway.home / ".codex" / "config.toml"
        config.write_text(config.read_text().replace(
            'wire_api = "responses"', 'wire_api = "responses"\nstream_idle_timeout_ms = 1000\nstream_max_retries = 2'))
        env = {"PATH": os.environ["PATH"], "HOME": str(gateway.home), "CODEX_HOME": str(gateway.home / ".codex"),
               **setup.env}
        command = adapter.command("say that you are done")
        command[2:2] = ["--strict-config", "--ephemeral"]
        done = run_cli(command, cwd=gateway.work, env=env)
        calls = gateway.store.calls(session)
        gateway.store.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "idle timeout" not in done.stdout, done.stdout
    assert [c.status for c in calls] == ["ok"]  # no try was cut (a cut try is recorded as cancelled)
