"""The run ledger's and the run controls' contract, run against every store: SQLite and PostgreSQL.

The invariants (rollout/store/ledger.py): a group completes when its last rollout finishes; a
step commits atomically with the groups and feedback it consumed, and a group or a piece of
feedback is never trained twice; a rollout's calls are its session's and its sub-sessions'
(``{session}:{branch}``), never another session's that merely starts with the same text.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_call_stats import record

from arborl.rollout.store import (
    DONE,
    INFRA_FAILED,
    SERVING_PIN,
    TRAINING_PAUSED,
    LedgerError,
    RunControls,
    RunLedger,
    TrajectoryStore,
)

OpenStore = Callable[[], TrajectoryStore]  # the ``open_store`` fixture (conftest.py)


def test_groups_complete_and_steps_consume_them_once(open_store: OpenStore):
    ledger = RunLedger(open_store())
    first = ledger.open_group("t1", 2, meta={"key": "plan-a", "fingerprint": "f1"})
    second = ledger.open_group("t2", 1, domain="code", trainable=False)
    assert second > first
    ledger.start_rollout("a", first, scaffold="builtin")
    ledger.start_rollout("b", first, scaffold="builtin")
    ledger.start_rollout("c", first, scaffold="builtin")
    ledger.fail_rollout("c", "sandbox died")
    assert ledger.finish_rollout("a", 1.0, outcome="passed") is False
    with pytest.raises(LedgerError):
        ledger.finish_rollout("c", 1.0)  # failed: not running any more
    assert ledger.finish_rollout("b", 0.0) is True
    ledger.start_rollout("e", second, scaffold="builtin")
    assert ledger.finish_rollout("e", 1.0) is True

    assert [g.id for g in ledger.pending_groups()] == [first]  # the evaluation group is not trainable
    assert [r.session_id for r in ledger.rollouts(first)] == ["a", "b"]
    assert [r.session_id for r in ledger.rollouts(first, status=INFRA_FAILED)] == ["c"]
    assert ledger.rollout_outcomes(first, status=DONE) == ["passed", ""]
    assert ledger.group_by_key("plan-a").id == first
    assert ledger.group_by_key("plan-a", fingerprint="f1").id == first
    assert ledger.group_by_key("plan-a", fingerprint="f2") is None
    assert ledger.group_by_key("plan-b") is None
    assert ledger.is_rollout("a") and not ledger.is_rollout("zzz")

    ledger.commit_step(1, 1, "ckpt/1", [first], {"loss": 0.5})
    with pytest.raises(LedgerError, match="not pending"):
        ledger.commit_step(2, 2, "ckpt/2", [first], {})
    assert ledger.last_step().step == 1 and [s.step for s in ledger.steps()] == [1]  # the refused one left nothing
    ledger.annotate_step(1, {"publish_s": 0.25})
    assert ledger.last_step().metrics == {"loss": 0.5, "publish_s": 0.25}
    with pytest.raises(LedgerError):
        ledger.annotate_step(9, {})
    assert ledger.consumed() == {first: 1}
    assert ledger.pending_groups() == []


def test_steps_keep_their_order_and_the_newest_can_be_asked_for(open_store: OpenStore):
    ledger = RunLedger(open_store())
    for step in (1, 2, 3):
        ledger.commit_step(step, step, f"ckpt/{step}", [], {"step": step})
    assert [s.step for s in ledger.steps()] == [1, 2, 3]
    assert [s.step for s in ledger.steps(last=2)] == [2, 3]
    assert ledger.last_step().checkpoint == "ckpt/3"


def test_dropped_groups_are_never_trained(open_store: OpenStore):
    ledger = RunLedger(open_store())
    group = ledger.open_group("t", 1)
    ledger.start_rollout("a", group, scaffold="builtin")
    ledger.finish_rollout("a", 1.0)
    ledger.drop_groups([group], "stale")
    assert ledger.group(group).dropped == "stale" and ledger.pending_groups() == []
    with pytest.raises(LedgerError):
        ledger.commit_step(1, 1, "ckpt/1", [group], {})
    with pytest.raises(KeyError):
        ledger.group(group + 100)


def test_feedback_is_trained_on_once(open_store: OpenStore):
    ledger = RunLedger(open_store())
    reward = ledger.add_feedback("prod-1", who="alice", reward=0.75)
    accept = ledger.add_feedback("prod-2", who="bob", call_id="c1", accept=False)
    skipped = ledger.add_feedback("prod-3", who="bob", accept=True)
    assert accept.id > reward.id and accept.value == 0.0 and reward.value == 0.75
    assert [(f.id, f.accept) for f in ledger.pending_feedback()] == [(reward.id, None), (accept.id, False),
                                                                      (skipped.id, True)]
    ledger.skip_feedback([skipped.id])
    ledger.commit_step(1, 1, "ckpt/1", [], {}, feedback_ids=[reward.id, accept.id])
    assert ledger.pending_feedback() == []
    with pytest.raises(LedgerError, match="trained on already"):
        ledger.commit_step(2, 2, "ckpt/2", [], {}, feedback_ids=[reward.id])


def test_a_rollouts_calls_are_its_session_and_sub_sessions_only(open_store: OpenStore):
    store = open_store()
    ledger = RunLedger(store)
    group = ledger.open_group("t", 1)
    ledger.start_rollout("r-1", group, scaffold="builtin")
    record(store, "main", prompt=10, completion=4, started=100.0, seconds=1.0, session="r-1")
    record(store, "sub", prompt=6, completion=2, started=101.0, seconds=2.0, session="r-1:agent-1",
           purpose="subagent")
    record(store, "title", prompt=3, completion=1, started=102.0, seconds=0.5, session="r-1", purpose="title")
    # ids that sort near "r-1:" in some collations but are other sessions
    for other in ("r-10", "r-1;", "r-1", "R-1:x", "r-1 :x"):
        if other != "r-1":
            record(store, f"other-{other}", prompt=50, completion=5, started=103.0, seconds=9.0, session=other)
    store.record_refusal("r-1:agent-1", "prompt too long")
    store.record_refusal("r-10", "prompt too long")
    stats = ledger.call_stats("r-1")
    assert (stats.calls, stats.prompt_tokens, stats.completion_tokens, stats.model_s, stats.refused) == (
        2, 16, 6, 3.0, 1)
    assert [c.id for c in ledger.training_calls("r-1")] == ["main", "sub"]


def test_controls_and_their_audit_log_commit_together(open_store: OpenStore):
    store = open_store()
    controls = RunControls(store)
    assert controls.training_paused is False and controls.serving_pin is None
    first = controls.act("alice", "pause", {"why": "looking"}, {TRAINING_PAUSED: True})
    second = controls.act("bob", "rollback", {"to": 3}, {SERVING_PIN: 3, TRAINING_PAUSED: False})
    assert second.id > first.id
    assert controls.serving_pin == 3 and controls.training_paused is False
    assert [(a.who, a.action, a.details) for a in controls.actions()] == [
        ("alice", "pause", {"why": "looking"}), ("bob", "rollback", {"to": 3})]
    assert [a.action for a in controls.actions(last=1)] == ["rollback"]
    reopened = RunControls(open_store())  # another process sees the same state
    assert reopened.serving_pin == 3 and len(reopened.actions()) == 2
