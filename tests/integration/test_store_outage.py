"""The store's database goes away under a serving gateway, then comes back.

A real PostgreSQL server of this test's own (tests/postgres_server.py), crashed with
``pg_ctl -m immediate`` and started again on its port, under a real gateway on loopback:
- while it is away, requests get a 503 with Retry-After in the dialect's own error format
  (OpenAI's error object; Anthropic's ``overloaded_error`` with its 529), and a stream whose call
  cannot be recorded ends with the dialect's error event: no client is handed an answer that
  is not in the store;
- when it is back, the same gateway serves and records again, without a restart;
- every answer delivered before the outage is in the store.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.ops.local_gateway import ServerThread
from arborl.rollout.store import PostgresTrajectoryStore
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.slow

USER = {"role": "user", "content": "Say hi."}


class HeldEngine(ScriptedEngine):
    """The scripted engine; a stream started while ``hold`` is set stops after its first token
    until the test clears it (so the database can go away mid-stream)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.held = threading.Event()  # a stream is waiting

    def generate(self, prompt_ids, params, *, cache_key=None):
        return self._held(super().generate(prompt_ids, params, cache_key=cache_key), self.hold.is_set())

    async def _held(self, tokens, hold: bool):
        n = 0
        async for event in tokens:
            yield event
            n += 1
            while hold and n == 1 and self.hold.is_set():
                self.held.set()
                await asyncio.sleep(0.01)


@pytest.fixture
def own_server():
    """A PostgreSQL server for this test alone: crashing it must not touch the other tests' server."""
    import postgres_server as server

    if server.binary("initdb") is None:
        pytest.skip("PostgreSQL is not installed (ops/bootstrap.sh installs it)")
    folder = Path(tempfile.mkdtemp(prefix="arborl-pg-outage-"))
    try:
        yield server, folder, server.start(folder)
    finally:
        server.stop(folder)


def _chat(url: str, session: str) -> httpx.Response:
    return httpx.post(f"{url}/s/{session}/v1/chat/completions", json={"model": "tiny", "messages": [USER]},
                      timeout=30)


def test_a_database_outage_is_a_503_and_the_gateway_recovers_without_a_restart(own_server, tiny_model_dir):
    from transformers import AutoTokenizer

    server, folder, dsn = own_server
    engine = HeldEngine(AutoTokenizer.from_pretrained(tiny_model_dir), lambda prompt: "one two three")
    store = PostgresTrajectoryStore(dsn, unavailable_after_s=1.0)
    try:
        with ServerThread(create_app(engine, store, GatewaySettings())) as url:
            before = _chat(url, "before")
            assert before.status_code == 200

            # mid-stream: the first token is out, then the database crashes before the call is recorded
            engine.hold.set()
            body = {"model": "tiny", "messages": [USER], "stream": True}
            with httpx.stream("POST", url + "/s/cut/v1/chat/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert engine.held.wait(10)
                server.crash(folder)
                engine.hold.clear()
                rest = [line[6:] for line in lines if line.startswith("data: ")]
            assert json.loads(first[6:])["object"] == "chat.completion.chunk"
            error = json.loads(rest[-2] if rest[-1] == "[DONE]" else rest[-1])
            assert error["error"]["code"] == "store_unavailable", rest[-3:]

            # while it is away: OpenAI's error object, Anthropic's 529, both with Retry-After
            refused = _chat(url, "during")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert refused.headers["x-should-retry"] == "true"
            anthropic = httpx.post(url + "/s/during/v1/messages", timeout=30, json={
                "model": "tiny", "max_tokens": 8, "messages": [USER]})
            assert anthropic.status_code == 529 and anthropic.headers["retry-after"] == "2"
            assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "overloaded_error"
            assert dsn.rsplit("@", 1)[-1] not in anthropic.text + refused.text  # never where the store is
            assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # the event loop is not stuck

            server.restart(folder)
            for _ in range(20):  # the pool reconnects by itself: seconds, not a restart
                after = _chat(url, "after")
                if after.status_code == 200:
                    break
                assert after.status_code == 503
                asyncio.run(asyncio.sleep(0.5))
            assert after.status_code == 200
            metrics = httpx.get(url + "/metrics", timeout=10).text
            assert "arborl_calls_unrecorded_total 1.0" in metrics
    finally:
        store.close()

    reader = PostgresTrajectoryStore(dsn)
    try:
        recorded = {s["id"]: s["calls"] for s in reader.sessions()}
        assert recorded.get("before") == 1 and recorded.get("after") == 1
        assert not recorded.get("cut") and not recorded.get("during")  # never answered, never recorded
        (call,) = reader.calls("before")
        assert json.loads(reader.call_bodies(call.id)["request_body"]) == {"model": "tiny", "messages": [USER]}
    finally:
        reader.close()
