"""``arborl store migrate``: SQLite -> PostgreSQL -> SQLite loses nothing and keeps every id.

The run is written through the store's own API (calls stored as deltas, branches, a group
with rewards, feedback, a training step, controls and the audit log, session keys, a refusal),
on a real PostgreSQL server. Small batches make the copy page through every table.
"""

from __future__ import annotations

import random

import pytest
from test_call_deltas import Agent

from arborl.ops.cli import main
from arborl.rollout.records import CallRecord
from arborl.rollout.store import (
    STORE_FILE_NAME,
    PostgresTrajectoryStore,
    RunControls,
    RunLedger,
    SqliteTrajectoryStore,
    TrajectoryStore,
)
from arborl.rollout.store import migrate as migration


def _call(call_id: str, session: str, prompt: list[int], completion: list[int]) -> CallRecord:
    return CallRecord(id=call_id, session_id=session, dialect="openai_chat", model="m", prompt_ids=prompt,
                      completion_ids=completion, completion_logprobs=[-0.25] * len(completion),
                      completion_versions=[2**40] * len(completion))


def _write_a_run(store: TrajectoryStore) -> str:
    """Writes a small run; returns the session key it issued."""
    rng = random.Random(0)
    agent = Agent("claude-s1", "you are an agent", rng)
    for n in range(12):  # one long session: its requests are stored as deltas
        store.record_call(agent.call(n))
        agent.answered(n)
    store.record_call(_call("b0", "branchy", [1, 2, 3], [4, 5]))
    store.record_call(_call("b1", "branchy", [1, 2, 3, 4, 5, 6], [7]))
    store.record_call(_call("b2", "branchy", [1, 2, 9], [8]))  # splits a node
    ledger, controls = RunLedger(store), RunControls(store)
    for task in ("t1", "t2"):
        group = ledger.open_group(task, 2, domain="code", meta={"fingerprint": task})
        for r in range(2):
            session = f"{task}-r{r}"
            ledger.start_rollout(session, group, scaffold="builtin")
            store.record_call(_call(f"{session}-0", session, [10 + r, 11, 12], [13, 14, 15]))
            ledger.finish_rollout(session, float(r), outcome="passed" if r else "failed")
    first = ledger.add_feedback("claude-s1", who="alice", call_id="claude-s1-3", reward=1.0)
    ledger.add_feedback("claude-s1", who="bob", accept=False)
    ledger.commit_step(1, 1, "checkpoints/v1", [ledger.pending_groups()[0].id], {"loss": 0.5},
                       feedback_ids=[first.id])
    controls.act("alice", "set", {"lr": 1e-6}, {"learner_overrides": {"lr": 1e-6}})
    controls.act("bob", "pause-training", {}, {"training_paused": True})
    key = store.issue_session_key("rollout-9")
    store.record_refusal("rollout-9", "context_length")
    return key


def _tables(store: TrajectoryStore) -> dict[str, list[tuple]]:
    """Every row of every table, in one order whatever the database."""
    return {table: sorted((tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                           for row in store.query(f"SELECT * FROM {table}")), key=repr)
            for table, _ in migration.TABLES}


def test_sqlite_to_postgres_to_sqlite_loses_nothing_and_keeps_ids(tmp_path, postgres_dsn, monkeypatch, capsys):
    monkeypatch.setattr(migration, "BATCH_ROWS", 3)
    original = SqliteTrajectoryStore(tmp_path / "run" / STORE_FILE_NAME)
    key = _write_a_run(original)
    before = _tables(original)
    calls_before = {s: original.calls(s) for s in ("claude-s1", "branchy", "t1-r0")}
    bodies_before = original.call_bodies("claude-s1-11")
    original.close()
    assert len(before["calls"]) == 19 and len(before["nodes"]) > 6 and before["admin_actions"]

    main(["store", "migrate", str(tmp_path / "run"), postgres_dsn])
    printed = capsys.readouterr()
    assert "calls" in printed.out and "19" in printed.out and "rows from" in printed.err
    main(["store", "migrate", postgres_dsn, str(tmp_path / "back.sqlite")])

    back = SqliteTrajectoryStore(tmp_path / "back.sqlite")
    assert _tables(back) == before
    server = PostgresTrajectoryStore(postgres_dsn)
    assert {s: server.calls(s) for s in calls_before} == calls_before
    assert server.call_bodies("claude-s1-11") == bodies_before
    assert server.trie("branchy").num_tokens == back.trie("branchy").num_tokens == 9
    assert server.session_for_key(key) == back.session_for_key(key) == "rollout-9"
    assert server.refusals("rollout-9")[0][1] == "context_length"

    # The destination goes on past every copied id: new nodes, groups, feedback and actions.
    for store in (server, back):
        ids = {table: max(row[0] for row in before[table]) for table in ("nodes", "groups", "feedback",
                                                                          "admin_actions")}
        store.record_call(_call("b3", "branchy", [1, 2, 3, 4, 5, 6, 7, 20], [21]))
        store.record_call(_call("n0", "new-session", [30, 31], [32]))
        group = RunLedger(store).open_group("t3", 1)
        feedback = RunLedger(store).add_feedback("branchy", who="carol", reward=0.5)
        action = RunControls(store).act("carol", "resume-training", {}, {"training_paused": False})
        new_nodes = store.query("SELECT MIN(id) FROM nodes WHERE session_id = ?", ("new-session",))[0][0]
        assert new_nodes > ids["nodes"] and group > ids["groups"]
        assert feedback.id > ids["feedback"] and action.id > ids["admin_actions"]
        assert store.call_tokens(store.calls("branchy")[-1]) == ([1, 2, 3, 4, 5, 6, 7, 20], [21])
    server.close()
    back.close()


def test_a_destination_with_rows_is_refused_and_left_as_it_was(tmp_path, postgres_dsn, capsys):
    source = SqliteTrajectoryStore(tmp_path / "a.sqlite")
    _write_a_run(source)
    source.close()
    occupied = PostgresTrajectoryStore(postgres_dsn)
    occupied.record_call(_call("x0", "already-here", [1], [2]))
    occupied.close()
    with pytest.raises(SystemExit, match="is not empty.*sessions"):
        main(["store", "migrate", str(tmp_path / "a.sqlite"), postgres_dsn])
    reopened = PostgresTrajectoryStore(postgres_dsn)
    assert [row[0] for row in reopened.query("SELECT id FROM calls")] == ["x0"]
    reopened.close()
    with pytest.raises(SystemExit, match="no store at"):
        main(["store", "migrate", str(tmp_path / "missing.sqlite"), str(tmp_path / "b.sqlite")])


def test_a_copy_that_fails_midway_leaves_the_destination_empty(tmp_path, postgres_dsn, monkeypatch):
    """SQLite keeps whatever a column is given; PostgreSQL refuses a call whose time is text. The
    copy stops there and the destination holds nothing, so the migration can run again."""
    monkeypatch.setattr(migration, "BATCH_ROWS", 3)
    source = SqliteTrajectoryStore(tmp_path / "a.sqlite")
    _write_a_run(source)
    with source.transaction() as db:
        db.execute("UPDATE calls SET created_at = 'yesterday' WHERE id = ?", ("t2-r1-0",))
    source.close()
    with pytest.raises(SystemExit, match="calls:.*refused"):
        main(["store", "migrate", str(tmp_path / "a.sqlite"), postgres_dsn])
    destination = PostgresTrajectoryStore(postgres_dsn)
    assert all(not rows for rows in _tables(destination).values())
    destination.close()
