"""The real Claude Code CLI (`claude -p`) against a live arborl gateway.

A scripted engine plays the policy: it writes a file with Claude Code's Write tool, reads it
back with Bash, then answers. Claude Code must run both tools for real (the file appears on
disk, the command's output comes back in the next request), and its calls must form one
stitched path in the session's trie.
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
from arborl.scaffold_adapters.claude_code import ClaudeCodeAdapter

HERMES = get_parser("hermes")
FINAL = "Done: hello.txt contains hi."


def write_then_cat(prompt: str) -> str:
    """Claude Code's system prompt names the working directory; tool results count the steps."""
    if "<tools>" not in prompt:
        return "ok"  # a side call without tools (title, summary)
    cwd = re.search(r"(?:Primary working directory|CWD): (\S+)", prompt)
    step = prompt.count("<tool_response>")
    if cwd is None:
        return "no working directory in the prompt"
    if step == 0:
        return "I will create the file.\n" + HERMES.format_call(
            "Write", {"file_path": f"{cwd.group(1)}/hello.txt", "content": "hi\n"})
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 1:
        return HERMES.format_call("Bash", {"command": "cat hello.txt", "description": "Show hello.txt"})
    # The answer is only right if the command's output really came back to the model.
    return FINAL if "hi" in last_result else f"the command's output did not come back: {last_result[:200]!r}"


@pytest.mark.e2e("claude")
def test_claude_code_runs_tools_through_arborl(tiny_model_dir: Path, tmp_path: Path):
    session = str(uuid.uuid4())
    adapter = ClaudeCodeAdapter()
    with scripted_gateway(tiny_model_dir, tmp_path, write_then_cat) as gateway:
        store, work, home = gateway.store, gateway.work, gateway.home
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny"))
        env = {
            "PATH": os.environ["PATH"], "HOME": str(home), "CLAUDE_CODE_TMPDIR": str(tmp_path),
            "IS_SANDBOX": "1",  # allows --dangerously-skip-permissions as root (CI runs as root)
            "CLAUDE_CODE_MAX_RETRIES": "1", **setup.env,
        }
        command = adapter.command("create a file hello.txt containing hi") + [
            "--tools", "Write,Bash", "--session-id", session, "--no-session-persistence",
            "--setting-sources", "", "--strict-mcp-config",
        ]
        done = run_cli(command, cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["is_error"] is False and result["result"] == FINAL and result["num_turns"] == 3
    assert (work / "hello.txt").read_text() == "hi\n"  # the Write tool really ran

    calls = store.calls("claude-" + session)
    assert [c.status for c in calls] == ["ok"] * 3 and all(c.token_exact for c in calls)
    assert [c.branch_reason for c in calls] == [None] * 3
    assert calls[1].stitched_from == calls[0].id and calls[2].stitched_from == calls[1].id
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in calls]
    assert [t[0]["name"] for t in tool_calls[:2]] == ["Write", "Bash"] and tool_calls[2] is None
    trie = store.trie("claude-" + session)
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len  # one path
    store.close()
