"""The real OpenCode CLI (`opencode run`), and its fork Kilo Code (`kilo run`), against a live
arborl gateway, over Chat Completions.

A scripted engine plays the policy: it writes a file with OpenCode's write tool, reads it back
with bash, then answers. OpenCode must run both tools for real (the file appears on disk, the
command's output comes back in the next request), finish cleanly, and its main agent's calls
must form one stitched path in the session's trie. Its title call is recorded apart from them.
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
from arborl.scaffold_adapters.base import MAIN, CallPurpose, GatewayTarget
from arborl.scaffold_adapters.opencode import KiloCodeAdapter, OpenCodeAdapter

HERMES = get_parser("hermes")
FINAL = "Done: hello.txt contains hi."
TITLE = "Hello file"


def write_then_cat(prompt: str) -> str:
    """OpenCode's system prompt names the working directory; tool results count the steps."""
    if "<tools>" not in prompt:
        return TITLE  # the title call, which has no tools
    cwd = re.search(r"Working directory: (\S+)", prompt)
    step = prompt.count("<tool_response>")
    if cwd is None:
        return "no working directory in the prompt"
    if step == 0:
        return "I will create the file.\n" + HERMES.format_call(
            "write", {"filePath": f"{cwd.group(1)}/hello.txt", "content": "hi\n"}
        )
    last_result = prompt.rsplit("<tool_response>", 1)[-1]
    if step == 1:
        return HERMES.format_call("bash", {"command": "cat hello.txt", "description": "Show hello.txt"})
    # The answer is only right if the command's output really came back to the model.
    return FINAL if "hi" in last_result else f"the command's output did not come back: {last_result[:200]!r}"


def _environment(home: Path, adapter_env: dict[str, str]) -> dict[str, str]:
    """OpenCode's environment: a HOME and XDG folders of its own, and what its adapter sets."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        **adapter_env,
    }


@pytest.mark.parametrize("adapter", [
    pytest.param(OpenCodeAdapter(), marks=pytest.mark.e2e("opencode"), id="opencode"),
    pytest.param(KiloCodeAdapter(), marks=pytest.mark.e2e("kilo"), id="kilocode"),
])
def test_opencode_runs_tools_through_arborl(adapter: OpenCodeAdapter, tiny_model_dir: Path, tmp_path: Path):
    session = str(uuid.uuid4())
    with scripted_gateway(tiny_model_dir, tmp_path, write_then_cat) as gateway:
        store, work, home, app = gateway.store, gateway.work, gateway.home, gateway.app
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(home)
        env = _environment(home, setup.env)
        done = run_cli(adapter.command("create a file hello.txt containing hi"), cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert not [e for e in events if e["type"] == "error"], done.stdout
    assert [e["part"]["text"] for e in events if e["type"] == "text"][-1] == FINAL
    assert [e["part"]["tool"] for e in events if e["type"] == "tool_use"] == ["write", "bash"]
    assert (work / "hello.txt").read_text() == "hi\n"  # the write tool really ran

    # Every call went through /s/{session}; auxiliary ones may be filed under "{session}:{branch}".
    ours = [s["id"] for s in store.sessions() if s["id"] == session or s["id"].startswith(session + ":")]
    calls = [c for sid in ours for c in store.calls(sid)]
    bodies = {c.id: json.loads(store.call_bodies(c.id)["request_body"]) for c in calls}
    main = sorted((c for c in calls if bodies[c.id].get("tools")), key=lambda c: c.seq)
    (title,) = [c for c in calls if not bodies[c.id].get("tools")]

    assert len(main) == 3 and all(c.session_id == session for c in main)
    assert [c.status for c in main] == ["ok"] * 3 and all(c.token_exact for c in main)
    assert main[1].stitched_from == main[0].id and main[2].stitched_from == main[1].id
    tool_calls = [store.call_bodies(c.id)["tool_calls"] for c in main]
    assert [t[0]["name"] for t in tool_calls[:2]] == ["write", "bash"] and tool_calls[2] is None
    last_prompt, last_completion = store.call_tokens(main[-1])
    last_path = last_prompt + last_completion
    for call in main:  # one path: every main call's tokens begin the last one's
        prompt, completion = store.call_tokens(call)
        assert last_path[: len(prompt) + len(completion)] == prompt + completion

    # OpenCode's traffic, as OpenCodeAdapter.call_purpose classifies it.
    assert app.headers and all(h["user-agent"].startswith(adapter.user_agent) for h in app.headers)
    headers = app.headers[0]
    assert adapter.call_purpose(headers, bodies[title.id]) == CallPurpose("title", branch="title")
    assert all(adapter.call_purpose(headers, bodies[c.id]) == MAIN for c in main)
    assert title.status == "ok" and store.call_bodies(title.id)["response_body"]
    # The title call has its own trie; the main trie holds the main agent's one path alone.
    assert title.session_id == f"{session}:title" and title.purpose == "title"
    assert [c.branch_reason for c in main] == [None, None, None] and [c.purpose for c in main] == ["main"] * 3
    assert store.trie(session).num_tokens == len(last_path)
    store.close()


@pytest.mark.e2e("opencode")
def test_a_prefill_longer_than_opencodes_chunk_timeout_is_waited_out(tiny_model_dir: Path, tmp_path: Path):
    """OpenCode's provider option ``chunkTimeout`` cuts a stream that sends nothing for that long
    and retries it from scratch. Here every reply is silent for 3 s against a 1 s chunk timeout:
    the gateway's keep-alives keep OpenCode waiting, and each call is answered once."""
    session = str(uuid.uuid4())
    adapter = OpenCodeAdapter()
    with scripted_gateway(tiny_model_dir, tmp_path, lambda prompt: FINAL, first_token_delay_s=3.0,
                          stream_keepalive_s=0.25) as gateway:
        home = gateway.home
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        setup.write(home)
        config_file = home / ".config" / "opencode" / "opencode.json"
        config = json.loads(config_file.read_text())
        for provider in config["provider"].values():
            provider["options"]["chunkTimeout"] = 1000
        config_file.write_text(json.dumps(config))
        env = _environment(home, setup.env)
        done = run_cli(adapter.command("say that you are done"), cwd=gateway.work, env=env)
        ours = [s["id"] for s in gateway.store.sessions() if s["id"].split(":")[0] == session]
        calls = [c for sid in ours for c in gateway.store.calls(sid)]
        gateway.store.close()
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert not [e for e in events if e["type"] == "error"], done.stdout
    assert [e["part"]["text"] for e in events if e["type"] == "text"][-1] == FINAL
    assert calls and all(c.status == "ok" for c in calls), [(c.purpose, c.status) for c in calls]
