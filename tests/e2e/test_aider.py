"""The real aider CLI (`aider --message`) against a live arborl gateway, over Chat Completions.

aider has no tools: it edits files from the text of the reply. A scripted engine plays the
policy in aider's ``diff`` edit format: its first reply holds a SEARCH/REPLACE block that matches
nothing (aider's failed tool call), and aider must send back the failure; the second reply
creates hello.txt. The file must appear on disk.

aider rewrites its own history between calls: the edit format's reminder is appended to the
newest user message only, and the files in the chat are re-sent after the history. So its second
call branches (``history_edited``) after the prompt the two share (system prompt and worked
examples), which the test checks rather than hides.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from agent_cli import run_cli, scripted_gateway
from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.registry import get_adapter

FENCE = "`" * 3
MISSING = f"README\n{FENCE}\n<<<<<<< SEARCH\nnot in the file\n=======\nhi\n>>>>>>> REPLACE\n{FENCE}\n"
CREATE = f"hello.txt\n{FENCE}\n<<<<<<< SEARCH\n=======\nhi\n>>>>>>> REPLACE\n{FENCE}\n"


def fail_then_create(prompt: str) -> str:
    if "failed to match" in prompt.rsplit("I will edit README", 1)[-1]:
        return "I will create the file instead.\n\n" + CREATE
    return "I will edit README.\n\n" + MISSING


@pytest.mark.e2e("aider")
def test_aider_edits_through_arborl_and_sends_a_failed_edit_back(tiny_model_dir: Path, tmp_path: Path):
    session = "aider-" + uuid.uuid4().hex[:8]
    adapter = get_adapter("aider")
    with scripted_gateway(tiny_model_dir, tmp_path, fail_then_create) as gateway:
        store, work, home = gateway.store, gateway.work, gateway.home
        (work / "README").write_text("x\n")
        setup = adapter.setup(GatewayTarget(gateway.url, "test", "tiny", session_id=session))
        env = {"PATH": os.environ["PATH"], "HOME": str(home), **setup.env}
        # README is in the chat from the start, so the failed edit needs no file added to it
        command = adapter.command("create a file hello.txt containing hi") + ["--edit-format", "diff", "README"]
        done = run_cli(command, cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed to match" in done.stdout, done.stdout
    assert (work / "hello.txt").read_text() == "hi\n"  # the second edit really applied
    assert (work / "README").read_text() == "x\n"

    calls = store.calls(session)
    assert len(calls) == 2 and [c.status for c in calls] == ["ok"] * 2 and all(c.token_exact for c in calls)
    assert [c.purpose for c in calls] == ["main", "main"]
    assert [c.branch_reason for c in calls] == [None, "history_edited"]
    # the failed edit came back to the model as a user turn saying so, after the reply that failed
    assert "failed to match" in calls[1].messages[-1]["content"] and calls[1].messages[-1]["role"] == "user"
    replies = [m["content"] for m in calls[1].messages if m["role"] == "assistant"]
    assert calls[0].response_message["content"].strip() in [reply.strip() for reply in replies]
    # the branch point: after the system prompt and the worked examples the two calls share
    first, second = (sum(store.call_tokens(c), []) for c in calls)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared > calls[0].prompt_len // 2
    trie = store.trie(session)
    assert trie.num_tokens == len(first) + len(second) - shared  # two paths from the shared prefix
    store.close()
