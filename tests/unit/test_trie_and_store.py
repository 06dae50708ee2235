"""The trie's invariants and the store's durability and reload."""

from __future__ import annotations

import random

import pytest

from arborl.rollout.records import CallRecord
from arborl.rollout.store import SqliteTrajectoryStore
from arborl.rollout.trie import Trie


def _check_invariants(trie: Trie, paths: list[list[int]], leaves: list[int]) -> None:
    for path, leaf in zip(paths, leaves, strict=True):
        assert trie.path(leaf) == path
    for node in trie.nodes.values():
        children = [trie.nodes[c] for c in node.children.values()]
        assert len({c.tokens[0] for c in children}) == len(children)
        for child in children:
            assert child.parent == node.id and child.start == node.end
    distinct_prefixes = {tuple(p[:k]) for p in paths for k in range(1, len(p) + 1)}
    assert trie.num_tokens == len(distinct_prefixes)


@pytest.mark.parametrize("seed", range(20))
def test_random_inserts_keep_invariants(seed):
    rng = random.Random(seed)
    trie = Trie()
    paths, leaves = [], []
    for _ in range(30):
        if paths and rng.random() < 0.7:  # extend or branch off an earlier path
            base = rng.choice(paths)
            cut = rng.randint(1, len(base))
            path = base[:cut] + [rng.randint(0, 5) for _ in range(rng.randint(0, 6))]
        else:
            path = [rng.randint(0, 5) for _ in range(rng.randint(1, 8))]
        paths.append(path)
        leaves.append(trie.insert(path).leaf)
        _check_invariants(trie, paths, leaves)
    assert trie.match(paths[0]) == len(paths[0])


@pytest.mark.parametrize("seed", range(20))
def test_an_agents_paths_inserted_from_the_last_ones_end_build_the_same_trie(seed):
    """An agent's next call extends its last one; the trie goes on from that path's end instead of
    walking from the root. Interleaved with branches that split the last path (its leaf keeps
    its id and its path), the nodes are the same as inserting every path from the root."""
    rng = random.Random(seed)
    trie, walked = Trie(), Trie()
    paths, leaves = [], []
    for _ in range(40):
        if paths and rng.random() < 0.7:  # the agent's next turn: the last path and what it added
            path = paths[-1] + [rng.randint(0, 5) for _ in range(rng.randint(0, 6))]
        elif paths and rng.random() < 0.7:  # a branch off an earlier path (a retry, an edit)
            base = rng.choice(paths)
            path = base[: rng.randint(1, len(base))] + [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
        else:
            path = [rng.randint(0, 5) for _ in range(rng.randint(1, 8))]
        paths.append(path)
        leaves.append(trie.insert(path).leaf)
        walked._last = None  # the reference: every path walked from the root
        assert walked.insert(path).leaf == leaves[-1]
        _check_invariants(trie, paths, leaves)
    shape = {n.id: (n.parent, n.start, n.tokens, n.children) for n in trie.nodes.values()}
    assert shape == {n.id: (n.parent, n.start, n.tokens, n.children) for n in walked.nodes.values()}


def test_worked_split_example():
    trie = Trie()
    first = trie.insert([1, 2, 3, 4])
    second = trie.insert([1, 2, 5])
    assert second.shared == 2
    assert len(second.created) == 2 and second.changed[0].id == first.leaf
    assert trie.path(first.leaf) == [1, 2, 3, 4]
    prefix = trie.insert([1, 2])  # a path ending inside no node now ends at the split head
    assert prefix.created == [] and trie.path(prefix.leaf) == [1, 2]
    assert trie.match([1, 2, 3, 9]) == 3


def _call(i: int, session: str, prompt: list[int], completion: list[int], **kw) -> CallRecord:
    return CallRecord(
        id=f"c{i}", session_id=session, dialect="openai_chat", model="m", prompt_ids=prompt,
        completion_ids=completion, completion_logprobs=[-0.5] * len(completion),
        completion_versions=[3] * len(completion), **kw,
    )


def test_store_records_reloads_and_continues(tmp_path):
    store = SqliteTrajectoryStore(tmp_path / "s.sqlite")
    store.record_call(_call(0, "s", [1, 2, 3], [4, 5]))
    store.record_call(_call(1, "s", [1, 2, 3, 4, 5, 6], [7]))
    store.record_call(_call(2, "s", [1, 2, 9], [8], branch_reason="history_edited"))
    nodes, tokens = store.total_nodes, store.total_tokens
    store.close()

    reopened = SqliteTrajectoryStore(tmp_path / "s.sqlite")
    assert (reopened.total_nodes, reopened.total_tokens) == (nodes, tokens)
    calls = reopened.calls("s")
    expected = [([1, 2, 3], [4, 5]), ([1, 2, 3, 4, 5, 6], [7]), ([1, 2, 9], [8])]
    assert [reopened.call_tokens(c) for c in calls] == expected
    assert calls[0].completion_versions == [3, 3] and calls[0].versions == [3]
    assert calls[2].branch_reason == "history_edited"
    # node ids keep increasing after a restart, and the trie keeps growing from disk
    reopened.record_call(_call(3, "s", [1, 2, 3, 4, 5, 6, 7], [10]))
    assert reopened.call_tokens(reopened.calls("s")[3]) == ([1, 2, 3, 4, 5, 6, 7], [10])
    assert reopened.trie("s").num_tokens == 10  # 1..7, 10, 9, 8


def test_store_from_before_call_purposes_opens_and_keeps_its_calls(tmp_path):
    import sqlite3

    from arborl.rollout import store as store_module

    old_schema = store_module.SCHEMA.replace(",\n    purpose TEXT NOT NULL DEFAULT 'main'", "")
    assert "purpose" not in old_schema
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO calls(id, session_id, seq, dialect, status, node_id, prompt_len, completion_len, "
                   "completion_logprobs, completion_versions, token_exact, created_at) "
                   "VALUES ('c0', 's', 0, 'x', 'ok', 0, 0, 0, x'', x'', 1, 0)")
    store = SqliteTrajectoryStore(tmp_path / "old.sqlite")
    store.record_call(_call(1, "s", [1, 2], [3], purpose="title"))
    assert [c.purpose for c in store.calls("s")] == ["main", "title"]


def test_versions_past_32_bits_are_stored_exactly(tmp_path):
    store = SqliteTrajectoryStore(tmp_path / "s.sqlite")
    call = _call(0, "s", [1, 2], [3, 4, 5])
    call.completion_versions = [2**31 - 1, 2**31, 2**63 - 1]
    store.record_call(call)
    store.close()
    reopened = SqliteTrajectoryStore(tmp_path / "s.sqlite")
    assert reopened.calls("s")[0].completion_versions == [2**31 - 1, 2**31, 2**63 - 1]


def test_a_store_with_32_bit_versions_is_converted_once_when_opened(tmp_path):
    """Stores written before versions were 64-bit keep every version, and say their layout after."""
    import sqlite3
    from array import array

    from arborl.rollout.store import SCHEMA, STORE_LAYOUT

    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO calls(id, session_id, seq, dialect, status, node_id, prompt_len, completion_len, "
                   "completion_logprobs, completion_versions, token_exact, created_at) "
                   "VALUES ('c0', 's', 0, 'x', 'ok', 0, 0, 3, ?, ?, 1, 0)",
                   (array("f", [-1.0] * 3).tobytes(), array("i", [4, 5, 5]).tobytes()))
    for _ in range(2):  # a second open converts nothing again
        store = SqliteTrajectoryStore(tmp_path / "old.sqlite")
        assert store.calls("s")[0].completion_versions == [4, 5, 5]
        assert store.query("PRAGMA user_version") == [(STORE_LAYOUT,)]
        store.close()


def test_a_store_from_a_newer_arborl_is_refused(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "new.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer arborl"):
        SqliteTrajectoryStore(tmp_path / "new.sqlite")


def test_store_refuses_inconsistent_call(tmp_path):
    store = SqliteTrajectoryStore(tmp_path / "s.sqlite")
    bad = _call(0, "s", [1], [2, 3])
    bad.completion_logprobs = [-1.0]
    with pytest.raises(ValueError):
        store.record_call(bad)
    assert store.calls("s") == []


def test_session_keys(tmp_path):
    store = SqliteTrajectoryStore(tmp_path / "s.sqlite")
    key = store.issue_session_key("rollout-1")
    assert store.session_for_key(key) == "rollout-1"
    assert store.session_for_key("sk-other") is None


def test_trie_cache_is_bounded_and_reloads(tmp_path):
    store = SqliteTrajectoryStore(tmp_path / "s.sqlite", cached_tries=2)
    for i in range(5):
        store.record_call(_call(i, f"s{i}", [i, 1, 2], [3]))
    assert len(store._tries) == 2
    store.record_call(_call(9, "s0", [0, 1, 2, 3, 4], [5]))  # s0 was evicted: reloaded, then extended
    assert store.trie("s0").num_tokens == 6
    assert store.call_tokens(store.calls("s0")[1]) == ([0, 1, 2, 3, 4], [5])
