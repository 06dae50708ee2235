"""Calls stored as deltas (rollout/store/call_deltas.py): rebuilt exactly, stored in linear space."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from arborl.rollout.records import CallRecord
from arborl.rollout.store import STORE_LAYOUT, SqliteTrajectoryStore
from arborl.rollout.store.call_deltas import common_head, common_tail

TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 200, "parameters": {}}}
         for i in range(8)]


def _body(messages: list[dict], tools: list[dict] | None) -> str:
    """A request as an agent sends it: the whole conversation, a cache marker on its last message."""
    marked = [*messages[:-1], {**messages[-1], "cache_control": {"type": "ephemeral"}}] if messages else []
    return json.dumps({"model": "m", "max_tokens": 64, "messages": marked, "tools": tools, "stream": True})


class Agent:
    """A scripted agent conversation: each turn adds the reply and a tool result of ~400 bytes."""

    def __init__(self, session: str, system: str, rng: random.Random):
        self.session, self.rng = session, rng
        self.messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": "fix it"}]
        self.tools: list[dict] | None = TOOLS

    def call(self, n: int) -> CallRecord:
        prompt = [1 + (len(self.messages) + i) % 50 for i in range(3)]
        return CallRecord(
            id=f"{self.session}-{n}", session_id=self.session, dialect="anthropic_messages", model="m",
            prompt_ids=prompt, completion_ids=[7], completion_logprobs=[-0.1], completion_versions=[0],
            messages=list(self.messages), tools=self.tools, request_body=_body(self.messages, self.tools),
            response_message={"role": "assistant", "content": f"step {n}"},
        )

    def answered(self, n: int) -> None:
        self.messages += [{"role": "assistant", "content": f"step {n}"},
                          {"role": "tool", "tool_call_id": f"t{n}", "content": self.rng.randbytes(200).hex()}]


def _whole_bytes(call: CallRecord) -> int:
    return len(json.dumps(call.messages)) + len(call.request_body) + len(json.dumps(call.tools))


def test_calls_are_rebuilt_exactly_and_stored_in_linear_space(tmp_path):
    """A main conversation and a sub-agent interleave in one session; the tools change once, one
    call edits history, and the store is reopened midway: every call reads back exactly as it was
    recorded, and a call stored against a base holds about what its turn added."""
    rng = random.Random(0)
    path = tmp_path / "s.sqlite"
    store = SqliteTrajectoryStore(path)
    main, sub = Agent("s", "you are an agent", rng), Agent("s", "you are a sub-agent", rng)
    sent: dict[str, CallRecord] = {}
    for n in range(60):
        agent = sub if n % 5 == 4 else main
        if n == 25:
            main.tools = TOOLS[:5]  # the agent's tools change
        if n == 40:
            main.messages[3] = {**main.messages[3], "content": "compacted"}  # history edited
        if n == 30:
            store.close()
            store = SqliteTrajectoryStore(path)  # a restart: the next call has no base in memory
        call = agent.call(n)
        store.record_call(call)
        sent[call.id] = call
        agent.answered(n)

    stored = {c.id: c for c in store.calls("s")}
    assert list(stored) == list(sent)
    for call_id, call in sent.items():
        assert stored[call_id].messages == call.messages
        bodies = store.call_bodies(call_id)
        assert bodies["request_body"] == call.request_body and bodies["tools"] == call.tools

    with sqlite3.connect(path) as db:
        rows = dict(db.execute("SELECT id, LENGTH(messages) + LENGTH(request_body) + LENGTH(COALESCE(tools, '')) "
                               "FROM calls").fetchall())
        bases = dict(db.execute("SELECT id, base_call FROM calls").fetchall())
    # the first calls of main and of the sub-agent, and again after the restart
    whole = {"s-0", "s-4", "s-30", "s-34"}
    assert {cid for cid, base in bases.items() if base is None} == whole
    turn = 2 * (len(json.dumps(main.messages[-1])) + 8)  # what a turn adds, in messages and in the body
    for call_id, size in rows.items():
        if call_id not in whole | {"s-25", "s-40"}:  # (those two store their new tools, their edited history)
            assert size < 2 * turn + 300, (call_id, size, _whole_bytes(sent[call_id]))
    assert sum(rows.values()) < 0.1 * sum(_whole_bytes(c) for c in sent.values())


def test_a_store_of_whole_requests_from_before_deltas_opens_reads_and_continues(tmp_path):
    """A store written before deltas (layout 1: every request whole, no delta columns) reads back
    the same, is converted once, and later calls are stored as deltas."""
    path = tmp_path / "old.sqlite"
    rng = random.Random(1)
    agent, sent = Agent("s", "sys", rng), []
    for n in range(4):
        store = SqliteTrajectoryStore(path)  # a fresh process each time: every call is stored whole
        call = agent.call(n)
        store.record_call(call)
        sent.append(call)
        agent.answered(n)
        store.close()
    with sqlite3.connect(path) as db:
        for column in ("base_call", "messages_kept", "tools_kept", "request_head", "request_tail"):
            db.execute(f"ALTER TABLE calls DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 1")
    store = SqliteTrajectoryStore(path)
    for n in range(4, 8):
        call = agent.call(n)
        store.record_call(call)
        sent.append(call)
        agent.answered(n)
    assert [c.messages for c in store.calls("s")] == [c.messages for c in sent]
    assert [store.call_bodies(c.id)["request_body"] for c in sent] == [c.request_body for c in sent]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == STORE_LAYOUT  # converted to this layout
        bases = [b for (b,) in db.execute("SELECT base_call FROM calls ORDER BY seq")]
    assert bases == [None] * 5 + ["s-4", "s-5", "s-6"]


@pytest.mark.parametrize("seed", range(30))
def test_common_head_and_tail_are_the_longest(seed):
    rng = random.Random(seed)
    a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
    b = a[: rng.randint(0, len(a))] + "".join(rng.choice("ab") for _ in range(rng.randint(0, 10)))
    head = common_head(a, b)
    assert a[:head] == b[:head] and (head == min(len(a), len(b)) or a[head] != b[head])
    most = min(len(a), len(b)) - head
    tail = common_tail(a, b, most)
    assert tail <= most and a[len(a) - tail:] == b[len(b) - tail:]
    assert tail == most or a[len(a) - tail - 1] != b[len(b) - tail - 1]
