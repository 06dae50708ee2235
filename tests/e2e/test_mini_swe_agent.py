"""The real mini-swe-agent CLI (`mini -y`) against a live arborl gateway, over Chat Completions.

A scripted engine plays the policy: it creates a file with a shell command through mini's bash
tool, reads it back with cat, then submits with ``echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``
(after which mini makes no further call). mini must run the commands for real (the file appears
on disk, the command's output comes back in the next request), finish cleanly, and its calls must
form one stitched path in the session's trie.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from agent_cli import run_cli, scripted_gateway
from arborl.gateway.tool_parsers import get_parser
from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.mini_swe_agent import MiniSweAgentAdapter
from arborl.scaffold_adapters.registry import call_purpose

HERMES = get_parser("hermes")
SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
COMMANDS = ["printf 'hi\\n' > hello.txt", "cat hello.txt", SUBMIT]


def create_then_cat(prompt: str) -> str:
    """mini's prompt offers one bash tool; the tool results so far count the steps."""
    if "<tools>" not in prompt or '"bash"' not in prompt:
        return "no bash tool in the prompt"
    step = prompt.count("<tool_response>")
    if step == 0:
        return "I will create the file.\n" + HERMES.format_call("bash", {"command": COMMANDS[0]})
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 1:
        return "Now I check it.\n" + HERMES.format_call("bash", {"command": COMMANDS[1]})
    # Submitting is only right if the command's output really came back to the model.
    if step == 2 and '"output": "hi\\n"' in last_result:
        return "The file is there.\n" + HERMES.format_call("bash", {"command": SUBMIT})
    return f"the command's output did not come back: {last_result[:200]!r}"


@pytest.mark.e2e("mini")
def test_mini_swe_agent_runs_commands_through_arborl(tiny_model_dir: Path, tmp_path: Path):
    session = str(uuid.uuid4())
    adapter = MiniSweAgentAdapter(step_limit=10)
    with scripted_gateway(tiny_model_dir, tmp_path, create_then_cat) as gateway:
        store, work, home, app = gateway.store, gateway.work, gateway.home, gateway.app
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(home)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **setup.env}
        done = run_cli(adapter.command("create a file hello.txt containing hi"), cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "hello.txt").read_text() == "hi\n"  # the command really ran, in the working directory

    # mini's own record of the run, in the sandbox's HOME.
    trajectory = json.loads((home / ".config/mini-swe-agent/last_mini_run.traj.json").read_text())
    assert trajectory["info"]["exit_status"] == "Submitted", done.stdout + done.stderr
    assert trajectory["info"]["model_stats"]["api_calls"] == 3

    # Every call went through /s/{session} and is a main call: mini makes no auxiliary ones.
    assert [s["id"] for s in store.sessions()] == [session]
    calls = sorted(store.calls(session), key=lambda c: c.seq)
    bodies = [json.loads(store.call_bodies(c.id)["request_body"]) for c in calls]
    assert len(calls) == 3 and [c.status for c in calls] == ["ok"] * 3 and all(c.token_exact for c in calls)
    assert [c.purpose for c in calls] == ["main"] * 3 and [c.branch_reason for c in calls] == [None] * 3
    assert calls[1].stitched_from == calls[0].id and calls[2].stitched_from == calls[1].id
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in calls]
    assert [t[0]["name"] for t in tool_calls] == ["bash"] * 3
    assert [json.loads(t[0]["arguments"])["command"] for t in tool_calls] == COMMANDS

    # What mini sends: its one bash tool, the task in the first user message, each command's
    # output back as a tool message answering the call's id.
    assert all([t["function"]["name"] for t in body["tools"]] == ["bash"] for body in bodies)
    assert all(not body.get("stream") for body in bodies)
    messages = bodies[2]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert "create a file hello.txt containing hi" in messages[1]["content"]
    assert messages[-1]["tool_call_id"] == messages[-2]["tool_calls"][0]["id"]
    assert json.loads(messages[-1]["content"]) == {"returncode": 0, "output": "hi\n"}

    # No /v1/models or other request: the three model calls alone, from the OpenAI SDK litellm uses.
    assert len(app.headers) == 3
    assert all(h["user-agent"].startswith("OpenAI/Python") for h in app.headers)
    assert all(call_purpose(app.headers[0], body).kind == "main" for body in bodies)
    last_prompt, last_completion = store.call_tokens(calls[-1])
    last_path = last_prompt + last_completion
    for call in calls:  # one path: every call's tokens begin the last one's
        prompt, completion = store.call_tokens(call)
        assert last_path[: len(prompt) + len(completion)] == prompt + completion
    assert store.trie(session).num_tokens == len(last_path)
    store.close()
