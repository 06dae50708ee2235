"""The real OpenClaw agent (`openclaw agent exec`) against a live arborl gateway, over Chat Completions.

A scripted engine plays the policy: it writes a file with OpenClaw's write tool, reads it back
with exec, runs a command that fails, then answers. OpenClaw must run the tools for real (the
file appears on disk, the commands' output comes back in the next request), the failed command
must come back saying so, and its calls must form one stitched path in the session's trie.
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
from arborl.scaffold_adapters.registry import get_adapter

HERMES = get_parser("hermes")
FINAL = "Done: hello.txt contains hi."


def write_cat_fail(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "ok"  # a side call without tools
    step = prompt.count("<tool_response>")
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 0:
        workspace = re.search(r"Working directory: (\S+)", prompt)
        if workspace is None:
            return "no working directory in the prompt"
        return "I will create the file.\n" + HERMES.format_call(
            "write", {"path": f"{workspace.group(1)}/hello.txt", "content": "hi\n"})
    if step == 1:
        return HERMES.format_call("exec", {"command": "cat hello.txt"})
    if step == 2:
        if "hi" not in last_result:
            return f"the command's output did not come back: {last_result[:200]!r}"
        return HERMES.format_call("exec", {"command": "cat missing.txt"})
    failed = "exited with code 1" in last_result and "missing.txt" in last_result
    return FINAL if failed else f"the failure did not come back: {last_result[:300]!r}"


@pytest.mark.e2e("openclaw")
def test_openclaw_runs_tools_through_arborl(tiny_model_dir: Path, tmp_path: Path):
    session = "openclaw-" + uuid.uuid4().hex[:8]
    adapter = get_adapter("openclaw")
    with scripted_gateway(tiny_model_dir, tmp_path, write_cat_fail) as gateway:
        store, work, home = gateway.store, gateway.work, gateway.home
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(home)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **setup.env}
        done = run_cli(adapter.command("create a file hello.txt containing hi"), cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["final"] == FINAL, result
    assert result["toolSummary"]["tools"] == ["write", "exec"]
    assert (work / "hello.txt").read_text() == "hi\n"  # the write tool really ran

    calls = store.calls(session)
    assert len(calls) == 4 and [c.status for c in calls] == ["ok"] * 4 and all(c.token_exact for c in calls)
    assert [c.purpose for c in calls] == ["main"] * 4
    assert [c.branch_reason for c in calls] == [None] * 4
    assert all(calls[i + 1].stitched_from == calls[i].id for i in range(3))
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in calls]
    assert [t[0]["name"] for t in tool_calls[:3]] == ["write", "exec", "exec"] and tool_calls[3] is None
    failed = [m for m in calls[3].messages if m["role"] == "tool"][-1]
    assert "exited with code 1" in failed["content"] and "missing.txt" in failed["content"]
    trie = store.trie(session)
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len  # one path
    store.close()
