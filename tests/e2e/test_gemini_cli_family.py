"""The real Gemini CLI (`gemini -p`, Gemini API) and Qwen Code (`qwen`, its fork on Chat
Completions) against a live arborl gateway.

Both have the same tools (write_file, run_shell_command, ...), so one scripted policy drives
both: it writes a file with write_file, reads it back with run_shell_command, runs a command that
fails, then answers. The CLI must run the tools for real (the file appears on disk, the commands'
output comes back in the next request), its failed command must come back as a tool result that
says so, and its calls must form one stitched path in the session's trie.
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
# Where each CLI's first user turn names its working directory (Qwen Code's write_file wants
# absolute paths).
WORKSPACE = re.compile(r"(?:I'm currently working in the directory: |Workspace Directories:\*\*\n  - )(\S+)")


def write_cat_fail(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "ok"  # a side call without tools
    step = prompt.count("<tool_response>")
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 0:
        workspace = WORKSPACE.search(prompt)
        if workspace is None:
            return "no working directory in the prompt"
        return "I will create the file.\n" + HERMES.format_call(
            "write_file", {"file_path": f"{workspace.group(1)}/hello.txt", "content": "hi\n"})
    if step == 1:
        return HERMES.format_call("run_shell_command", {"command": "cat hello.txt", "description": "Show it"})
    if step == 2:
        if "hi" not in last_result:
            return f"the command's output did not come back: {last_result[:200]!r}"
        return HERMES.format_call("run_shell_command", {"command": "cat missing.txt", "description": "Fails"})
    return FINAL if "Exit Code: 1" in last_result else f"the failure did not come back: {last_result[:300]!r}"


def _final_answer(stdout: str) -> str:
    result = json.loads(stdout)
    if isinstance(result, list):  # Qwen Code: its stream of events, ending with the result
        return result[-1]["result"]
    return result["response"]


@pytest.mark.parametrize(("scaffold", "dialect"), [
    pytest.param("gemini-cli", "gemini", marks=pytest.mark.e2e("gemini")),
    pytest.param("qwen-code", "openai_chat", marks=pytest.mark.e2e("qwen")),
])
def test_the_cli_runs_tools_through_arborl(scaffold: str, dialect: str, tiny_model_dir: Path, tmp_path: Path):
    session = f"{scaffold}-{uuid.uuid4().hex[:8]}"
    adapter = get_adapter(scaffold)
    with scripted_gateway(tiny_model_dir, tmp_path, write_cat_fail) as gateway:
        store, work, home = gateway.store, gateway.work, gateway.home
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(home)
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **setup.env}
        done = run_cli(adapter.command("create a file hello.txt containing hi"), cwd=work, env=env)
        headers = list(gateway.app.headers)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _final_answer(done.stdout) == FINAL, done.stdout[-2000:]
    assert (work / "hello.txt").read_text() == "hi\n"  # write_file really ran

    assert all(adapter.call_purpose(h, {"tools": [{}]}) is not None for h in headers)  # the adapter knows it
    calls = store.calls(session)
    assert len(calls) == 4 and all(c.dialect == dialect for c in calls), [c.dialect for c in calls]
    assert [c.status for c in calls] == ["ok"] * 4 and all(c.token_exact for c in calls)
    assert [c.purpose for c in calls] == ["main"] * 4
    assert [c.branch_reason for c in calls] == [None] * 4
    assert all(calls[i + 1].stitched_from == calls[i].id for i in range(3))
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in calls]
    assert [t[0]["name"] for t in tool_calls[:3]] == ["write_file", "run_shell_command", "run_shell_command"]
    assert tool_calls[3] is None
    # the failed command came back as a tool result that says so
    failed = [m for m in calls[3].messages if m["role"] == "tool"][-1]
    assert "Exit Code: 1" in failed["content"] and "missing.txt" in failed["content"]
    trie = store.trie(session)
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len  # one path
    store.close()
