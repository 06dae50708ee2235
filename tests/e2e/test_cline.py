"""The real Cline CLI (`cline --json`) against a live arborl gateway, over Chat Completions.

A scripted engine plays the policy: it writes a file with Cline's editor tool, reads it back
with run_commands, then answers (a reply without tool calls ends Cline's run). Cline must run
both tools for real (the file appears on disk, the command's output comes back in the next
request), finish cleanly, and its calls must form one stitched path in the session's trie.
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
from arborl.scaffold_adapters.base import MAIN, GatewayTarget
from arborl.scaffold_adapters.cline import ClineAdapter

HERMES = get_parser("hermes")
FINAL = "Done: hello.txt contains hi."


def write_then_cat(prompt: str) -> str:
    """Cline's system prompt names the working directory; tool results count the steps."""
    if "<tools>" not in prompt:
        return "## Goal\nnothing to summarise"  # a side call without tools (compaction)
    cwd = re.search(r"Working Directory: (\S+)", prompt)
    step = prompt.count("<tool_response>")
    if cwd is None:
        return "no working directory in the prompt"
    if step == 0:
        return "I will create the file.\n" + HERMES.format_call(
            "editor", {"path": f"{cwd.group(1)}/hello.txt", "new_text": "hi\n"}
        )
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 1:
        return HERMES.format_call("run_commands", {"commands": ["cat hello.txt"]})
    # The answer is only right if the command's output really came back to the model.
    return FINAL if "hi" in last_result else f"the command's output did not come back: {last_result[:200]!r}"


@pytest.mark.e2e("cline")
def test_cline_runs_tools_through_arborl(tiny_model_dir: Path, tmp_path: Path):
    session = str(uuid.uuid4())
    adapter = ClineAdapter()
    with scripted_gateway(tiny_model_dir, tmp_path, write_then_cat) as gateway:
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(gateway.home)
        env = {"PATH": os.environ["PATH"], "HOME": str(gateway.home), "TMPDIR": str(tmp_path), **setup.env}
        done = run_cli(adapter.command("create a file hello.txt containing hi"), cwd=gateway.work, env=env)
        store, work, home, app = gateway.store, gateway.work, gateway.home, gateway.app
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = events[-1]
    assert result["type"] == "run_result", done.stdout[-2000:]
    assert result["finishReason"] == "completed" and result["text"] == FINAL and result["iterations"] == 3
    agent_events = [e["event"] for e in events if e["type"] == "agent_event"]
    ran = [e for e in agent_events if e["type"] == "content_end" and e.get("contentType") == "tool"]
    assert [e["toolName"] for e in ran] == ["editor", "run_commands"]
    assert ran[1]["output"][0]["result"] == "hi\n"
    assert (work / "hello.txt").read_text() == "hi\n"  # the editor tool really ran
    # No hub daemon was started (it would outlive the run in a process group of its own).
    assert not (home / ".cline/data/locks/hub").exists()

    calls = store.calls(session)
    assert len(calls) == 3 and {s["id"] for s in store.sessions()} == {session}
    assert [c.status for c in calls] == ["ok"] * 3 and all(c.token_exact for c in calls)
    assert [c.branch_reason for c in calls] == [None] * 3 and [c.purpose for c in calls] == ["main"] * 3
    assert calls[1].stitched_from == calls[0].id and calls[2].stitched_from == calls[1].id
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in calls]
    assert [t[0]["name"] for t in tool_calls[:2]] == ["editor", "run_commands"] and tool_calls[2] is None
    trie = store.trie(session)
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len  # one path

    # Cline's traffic, as ClineAdapter.call_purpose classifies it.
    bodies = [json.loads(store.call_bodies(c.id)["request_body"]) for c in calls]
    assert len(app.headers) == 3 and all(h["x-title"] == "Cline" for h in app.headers)
    assert all(adapter.call_purpose(h, b) == MAIN for h, b in zip(app.headers, bodies, strict=True))
    assert all(b["tools"] and b["stream"] for b in bodies)
    store.close()
