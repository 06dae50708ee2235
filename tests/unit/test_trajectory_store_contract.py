"""The trajectory store's contract, run against every implementation: SQLite and PostgreSQL.

Each test gets ``open_store``: a function that opens (or reopens, as a restarted or a second
process would) one store of the implementation under test. PostgreSQL is a real server
(tests/postgres_server.py; CI starts one), a fresh database per test.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest
from test_call_deltas import Agent
from test_trie_and_store import _call

from arborl.rollout.store import PostgresTrajectoryStore, SqliteTrajectoryStore, StoreUnavailable, TrajectoryStore

OpenStore = Callable[[], TrajectoryStore]  # the ``open_store`` fixture (conftest.py)


def test_records_reloads_and_continues(open_store: OpenStore):
    store = open_store()
    store.record_call(_call(0, "s", [1, 2, 3], [4, 5]))
    store.record_call(_call(1, "s", [1, 2, 3, 4, 5, 6], [7]))
    store.record_call(_call(2, "s", [1, 2, 9], [8], branch_reason="history_edited"))
    nodes, tokens = store.total_nodes, store.total_tokens
    store.close()

    reopened = open_store()
    assert (reopened.total_nodes, reopened.total_tokens) == (nodes, tokens)
    calls = reopened.calls("s")
    assert [c.seq for c in calls] == [0, 1, 2]
    assert [reopened.call_tokens(c) for c in calls] == [([1, 2, 3], [4, 5]), ([1, 2, 3, 4, 5, 6], [7]),
                                                        ([1, 2, 9], [8])]
    assert calls[0].completion_logprobs == [-0.5, -0.5] and calls[2].branch_reason == "history_edited"
    reopened.record_call(_call(3, "s", [1, 2, 3, 4, 5, 6, 7], [10]))
    assert reopened.call_tokens(reopened.calls("s")[3]) == ([1, 2, 3, 4, 5, 6, 7], [10])
    assert reopened.trie("s").num_tokens == 10 and reopened.last_seq("s") == 3 and reopened.last_seq("x") == -1


def test_versions_are_64_bit_and_inconsistent_calls_are_refused(open_store: OpenStore):
    store = open_store()
    call = _call(0, "s", [1], [2, 3, 4])
    call.completion_versions = [2**31 - 1, 2**31, 2**63 - 1]
    store.record_call(call)
    assert open_store().calls("s")[0].completion_versions == [2**31 - 1, 2**31, 2**63 - 1]
    bad = _call(1, "s", [1], [2, 3])
    bad.completion_logprobs = [-0.1]
    with pytest.raises(ValueError):
        store.record_call(bad)
    assert len(store.calls("s")) == 1


def test_sessions_keys_and_refusals(open_store: OpenStore):
    store = open_store()
    key = store.issue_session_key("rollout-1")
    store.record_refusal("rollout-1", "context_length")
    store.record_call(_call(0, "other", [1], [2]))
    again = open_store()  # another process sees what this one wrote
    assert again.session_for_key(key) == "rollout-1" and again.session_for_key("sk-arborl-nope") is None
    assert [reason for _, reason in again.refusals("rollout-1")] == ["context_length"]
    sessions = {s["id"]: s for s in again.sessions()}
    assert sessions["rollout-1"]["refused"] == 1 and sessions["other"]["calls"] == 1


def test_requests_are_stored_as_deltas_and_rebuilt_exactly(open_store: OpenStore):
    """An agent and a sub-agent interleave; the store is reopened midway: every call reads back
    whole and exact, and the session's bytes grow with what each turn adds."""
    rng = random.Random(0)
    store = open_store()
    main, sub = Agent("s", "you are an agent", rng), Agent("s", "you are a sub-agent", rng)
    sent, sizes = [], []
    for n in range(40):
        if n == 20:
            store.close()
            store = open_store()
        agent = sub if n % 5 == 4 else main
        call = agent.call(n)
        store.record_call(call)
        sent.append(call)
        agent.answered(n)
        sizes.append(store.session_bytes("s"))
    stored = store.calls("s")
    assert [c.id for c in stored] == [c.id for c in sent]
    assert [c.messages for c in stored] == [c.messages for c in sent]
    for call in sent:
        bodies = store.call_bodies(call.id)
        assert bodies["request_body"] == call.request_body and bodies["tools"] == call.tools
    early, late = sizes[12] - sizes[11], sizes[38] - sizes[37]  # two main-conversation turns
    assert late < 1.5 * early, (early, late)


def test_two_processes_record_into_one_store_without_colliding(open_store: OpenStore, request):
    """Two writers (two gateways): node ids never collide, and each session's seqs are distinct and
    increasing, whichever process recorded the call."""
    if "sqlite" in request.node.callspec.id:
        pytest.skip("SQLite has one writer process at a time")
    first, second = open_store(), open_store()
    errors: list[BaseException] = []

    def record(store: TrajectoryStore, name: str) -> None:
        try:
            for i in range(20):
                own = _call(i, f"{name}-{i % 2}", [i + 1, 2, 3], [4])  # sessions of its own
                own.id = f"{name}-own-{i}"
                store.record_call(own)
                shared = _call(i, "shared", [9, 9, i + 1], [5])  # one session both write into
                shared.id = f"{name}-shared-{i}"
                store.record_call(shared)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(store, name)) for name, store in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    reader = open_store()
    shared = reader.calls("shared")
    assert sorted(c.seq for c in shared) == list(range(40))
    # one copy of each prefix both wrote: [9, 9], then [i + 1, 5] for each of the 20 values of i
    assert reader.trie("shared").num_tokens == 2 + 20 * 2
    own = [c for name in ("a", "b") for s in (0, 1) for c in reader.calls(f"{name}-{s}")]
    assert len(own) == 40
    for call in own:  # every path reads back: no node of one process overwrote another's
        prompt, completion = reader.call_tokens(call)
        assert completion == [4] and prompt[1:] == [2, 3]


def test_a_session_that_switches_process_keeps_one_trie(open_store: OpenStore, request):
    """A conversation served by two gateways in turn (a load balancer moving it): each call
    extends the last, whichever process recorded it, and the session's trie holds its path once."""
    if "sqlite" in request.node.callspec.id:
        pytest.skip("SQLite has one writer process at a time")
    stores = [open_store(), open_store()]
    path: list[int] = [1, 2, 3]
    for turn in range(8):
        call = _call(turn, "moving", list(path), [100 + turn])
        stores[turn % 3 % 2].record_call(call)  # a, b, a, a, b, a, a, b
        path += [100 + turn, 50 + turn]
    reader = open_store()
    assert reader.trie("moving").num_tokens == len(path) - 1  # the last turn's user tokens were never sent
    assert [reader.call_tokens(c)[1] for c in reader.calls("moving")] == [[100 + t] for t in range(8)]
    for store in stores:  # each process reads the calls the other recorded
        assert store.call_tokens(reader.calls("moving")[-1])[0] == path[:-2]


def test_calls_recorded_at_once_all_commit_and_a_bad_one_fails_alone(open_store: OpenStore):
    """16 threads record at the same moment (they commit in shared transactions): every good call
    is stored with its own seq and path; the one whose id is taken fails, and only it."""
    store = open_store()
    store.record_call(_call(0, "s0", [1, 2], [3]))  # id c0
    start = threading.Barrier(16)
    outcomes: dict[int, object] = {}

    def record(i: int) -> None:
        call = _call(i, f"s{i % 4}", [1, 2, i + 3], [4])
        call.id = "c0" if i == 5 else f"t{i}"
        start.wait()
        try:
            store.record_call(call)
            outcomes[i] = call.seq
        except Exception as exc:  # noqa: BLE001 - checked below
            outcomes[i] = exc

    threads = [threading.Thread(target=record, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(outcomes.pop(5), Exception)
    assert all(isinstance(seq, int) for seq in outcomes.values()), outcomes
    reader = open_store()
    for s in range(4):
        calls = reader.calls(f"s{s}")
        assert [c.seq for c in calls] == list(range(len(calls)))
        assert len(calls) == (5 if s == 0 else 3 if s == 1 else 4)
        for call in calls[1 if s == 0 else 0:]:
            assert reader.call_tokens(call) == ([1, 2, int(call.id[1:]) + 3], [4])
    assert store.trie("s1").num_tokens == reader.trie("s1").num_tokens  # memory agrees with the store


def _cut_connections(dsn: str) -> int:
    """Cut every other connection to the test database, as a restarted server or a proxy would."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid != pg_backend_pid()").fetchall())


def test_a_connection_cut_while_idle_is_replaced_unnoticed(open_store: OpenStore, request):
    if "sqlite" in request.node.callspec.id:
        pytest.skip("SQLite has no connection to lose")
    store = open_store()
    store.record_call(_call(0, "s", [1, 2], [3]))
    assert _cut_connections(request.getfixturevalue("postgres_dsn")) >= 1
    store.record_call(_call(1, "s", [1, 2, 3, 4], [5]))  # its BEGIN meets the cut, and runs again
    assert store.last_seq("s") == 1 and [c.seq for c in open_store().calls("s")] == [0, 1]


def test_a_connection_cut_inside_a_transaction_writes_nothing_and_the_store_goes_on(open_store: OpenStore, request):
    if "sqlite" in request.node.callspec.id:
        pytest.skip("SQLite has no connection to lose")
    store = open_store()
    with pytest.raises(StoreUnavailable), store.transaction() as db:
        db.execute("INSERT INTO refused_requests(session_id, at, reason) VALUES ('s', 1, 'first')")
        _cut_connections(request.getfixturevalue("postgres_dsn"))
        db.execute("INSERT INTO refused_requests(session_id, at, reason) VALUES ('s', 2, 'second')")
    assert store.refusals("s") == []  # neither half of the transaction, and a new connection serves
    store.record_call(_call(0, "s", [1], [2]))
    assert [c.seq for c in open_store().calls("s")] == [0]


def test_a_store_from_a_newer_arborl_is_refused(open_store: OpenStore):
    store = open_store()
    if isinstance(store, SqliteTrajectoryStore):
        import sqlite3

        store.close()
        with sqlite3.connect(store.path) as db:
            db.execute("PRAGMA user_version = 99")
    else:
        with store.transaction() as db:
            db.execute("UPDATE arborl_store SET layout = 99")
        store.close()
    with pytest.raises(RuntimeError, match="newer arborl"):
        open_store()


def test_a_wrong_dsn_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot reach the store at postgresql://nobody@127.0.0.1:1/none"):
        PostgresTrajectoryStore("postgresql://nobody:secret@127.0.0.1:1/none", connect_timeout_s=1)
