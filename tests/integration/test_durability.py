"""A call whose response reached the client survives kill -9; a restart continues the session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from arborl.rollout.store import SqliteTrajectoryStore
from conftest import free_port


def _start(run_dir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "arborl.ops.cli", "serve", "--model", "tiny-random-llama", "--served-name", "tiny",
         "--port", str(port), "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, "the gateway exited during start-up"
        time.sleep(0.2)
    raise TimeoutError("the gateway did not become ready")


def test_kill_9_after_response_loses_nothing_and_restart_continues(tiny_model_dir, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/s/durable/v1"
    messages = [{"role": "user", "content": "Remember this."}]

    process = _start(tmp_path, port)
    try:
        client = openai.OpenAI(base_url=base, api_key="test", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, seed=3)
        os.killpg(process.pid, signal.SIGKILL)  # no shutdown hook, no flush: only what was committed
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    (call,) = store.calls("durable")
    assert call.status == "ok"
    assert call.completion_len == reply.usage.completion_tokens
    assert call.prompt_len == reply.usage.prompt_tokens
    first_path = store.trie("durable").path(call.node_id)
    store.close()

    process = _start(tmp_path, port)
    try:
        client = openai.OpenAI(base_url=base, api_key="test", max_retries=0)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "What did I say?"}]
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, seed=4)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    first, second = store.calls("durable")
    assert second.stitched_from == first.id and second.branch_reason is None
    prompt, _ = store.call_tokens(second)
    assert prompt[: len(first_path)] == first_path
    store.close()
