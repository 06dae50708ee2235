"""The contract of ``RunReadModel`` (rollout/store/read_model.py), run against every implementation.

A run is filled through the writers' own APIs (the trajectory store, the run ledger, the run
controls) on a clock the test sets, and every question's answer is checked; runs with nothing
written yet (no store, a store with nothing in its ledger or controls) must read as empty. Run
against SQLite and a real PostgreSQL server (a fresh database per test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from arborl.rollout.records import CallRecord
from arborl.rollout.store import (
    LEARNER_OVERRIDES,
    SERVING_PIN,
    FinishedReward,
    GroupCounts,
    OperatorAction,
    PostgresTrajectoryStore,
    RolloutTimes,
    RunControls,
    RunLedger,
    RunReadModel,
    ServedCall,
    SqliteTrajectoryStore,
    StepPassRate,
    TrajectoryStore,
    open_read_model,
)
from arborl.rollout.store import controls as controls_module
from arborl.rollout.store import ledger as ledger_module


@dataclass(frozen=True)
class Implementation:
    open_store: Callable[[Path], TrajectoryStore]  # the writers' store of a run folder
    open_read_model: Callable[[Path], RunReadModel]


@pytest.fixture(params=["sqlite", "postgres"])
def implementation(request) -> Implementation:
    if request.param == "sqlite":
        return Implementation(lambda run: SqliteTrajectoryStore(run / "store.sqlite"), open_read_model)
    dsn = request.getfixturevalue("postgres_dsn")  # a fresh database: the run's store, wherever its folder is
    return Implementation(lambda run: PostgresTrajectoryStore(dsn),
                          lambda run: open_read_model(run, store_url=dsn))


class Clock:
    """``time.time`` of the ledger and the controls: whatever the test last set."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    fake_time = SimpleNamespace(time=clock.time)
    monkeypatch.setattr(ledger_module, "time", fake_time)
    monkeypatch.setattr(controls_module, "time", fake_time)
    return clock


def _call(call_id: str, versions: list[int], first_token_at: float, finished_at: float) -> CallRecord:
    return CallRecord(
        id=call_id, session_id="production", dialect="openai_chat", model="m", prompt_ids=[1, 2],
        completion_ids=list(range(3, 3 + len(versions))), completion_logprobs=[-0.5] * len(versions),
        completion_versions=versions, created_at=first_token_at - 0.5, first_token_at=first_token_at,
        finished_at=finished_at,
    )


def _build_run(run: Path, implementation: Implementation, clock: Clock) -> None:
    store = implementation.open_store(run)
    ledger = RunLedger(store)

    def rollout(session: str, group: int, scaffold: str, start: float, end: float, reward: float | None) -> None:
        clock.now = start
        ledger.start_rollout(session, group, scaffold=scaffold)
        clock.now = end
        if reward is None:
            ledger.fail_rollout(session, "sandbox did not start")
        else:
            ledger.finish_rollout(session, reward)

    clock.now = 99.0
    first, second, running, stale, evaluation, waiting = (
        ledger.open_group("a", 2), ledger.open_group("b", 2), ledger.open_group("c", 2), ledger.open_group("d", 1),
        ledger.open_group("e", 1, trainable=False), ledger.open_group("f", 1))
    rollout("a0", first, "builtin", 100.0, 110.0, 1.0)
    rollout("a1", first, "claude-code", 101.0, 105.0, None)  # an infrastructure failure, then its retry
    rollout("a1-retry", first, "claude-code", 106.0, 120.0, 0.0)
    rollout("b0", second, "builtin", 130.0, 140.0, 1.0)
    rollout("b1", second, "builtin", 131.0, 150.0, 1.0)
    clock.now = 160.0
    ledger.start_rollout("c0", running, scaffold="builtin")  # still running
    rollout("d0", stale, "codex", 170.0, 175.0, 0.5)
    rollout("e0", evaluation, "builtin", 180.0, 190.0, 1.0)
    ledger.drop_groups([stale, evaluation], "stale")
    rollout("f0", waiting, "builtin", 195.0, 198.0, 1.0)
    clock.now = 205.0
    ledger.commit_step(1, 1, "/fake/step_1", [first], {"loss": 0.5, "started_at": 200.0, "finished_at": 205.0,
                                                        "published_at": 206.0})
    clock.now = 215.0
    ledger.commit_step(2, 2, "/fake/step_2", [second], {"loss": 0.25, "started_at": 210.0, "finished_at": 215.0,
                                                         "published_at": 216.0})
    store.record_call(_call("before", [0], 149.0, 150.0))
    store.record_call(_call("v1", [1, 1], 207.0, 209.0))
    store.record_call(_call("swap", [1, 2, 2], 214.0, 218.0))  # version 2 arrived mid-stream
    controls = RunControls(store)
    clock.now = 220.0
    controls.act("alice", "rollback", {"to": 1}, {SERVING_PIN: 1})
    clock.now = 230.0
    controls.act("bob", "set", {"lr": 1e-6}, {LEARNER_OVERRIDES: {"lr": 1e-6}})
    store.close()


def test_a_run_reads_as_it_was_written(run_root, implementation, clock):
    run = run_root / "run"
    _build_run(run, implementation, clock)
    with implementation.open_read_model(run) as model:
        assert model.exists()
        assert model.location
        last = model.last_step()
        assert last is not None and (last.step, last.version, last.created_at) == (2, 2, 215.0)
        assert last.metrics["loss"] == 0.25
        assert [(s.step, s.version, s.created_at, s.metrics["published_at"]) for s in model.train_steps()] == [
            (1, 1, 205.0, 206.0), (2, 2, 215.0, 216.0)]
        assert model.latest_trained_version() == 2

        assert model.training_rollouts_by_status() == {"done": 6, "infra_failed": 1, "running": 1}
        assert list(model.training_rollouts_by_scaffold().items()) == [
            ("builtin", 5), ("claude-code", 2), ("codex", 1)]  # the most used first; evaluations left out
        assert model.rollout_count() == 9
        assert model.rollout_times() == RolloutTimes(100.0, 195.0, 198.0)
        assert model.training_rewards() == [
            FinishedReward(110.0, 1.0), FinishedReward(120.0, 0.0), FinishedReward(140.0, 1.0),
            FinishedReward(150.0, 1.0), FinishedReward(175.0, 0.5), FinishedReward(198.0, 1.0)]
        assert model.recent_training_rewards(3) == [1.0, 0.5, 1.0]  # newest first
        assert model.training_rollouts_finished_between(115.0, 160.0) == 3
        assert model.training_rollouts_finished_between(105.0, 105.0) == 0  # the infrastructure failure

        assert model.training_group_counts() == GroupCounts(waiting=1, trained=2, dropped=1)
        assert model.dropped_groups_by_reason() == {"stale": 2}  # the evaluation group counts here
        assert model.pass_rate_by_step() == [StepPassRate(1, 0.5), StepPassRate(2, 1.0)]
        assert model.last_reward_by_step() == {1: 120.0, 2: 150.0}

        served = sorted(model.served_calls(206.0), key=lambda c: c.first_token_at or 0.0)
        assert served == [ServedCall(207.0, 209.0, [1, 1]), ServedCall(214.0, 218.0, [1, 2, 2])]
        assert len(list(model.served_calls(0.0))) == 3

        assert model.serving_pin() == 1
        actions = model.operator_actions(10)
        assert actions is not None and [(a.at, a.who, a.action) for a in actions] == [
            (230.0, "bob", "set"), (220.0, "alice", "rollback")]
        assert model.operator_actions(1) == [OperatorAction(230.0, "bob", "set", '{"lr": 1e-06}')]


def _assert_empty(model: RunReadModel, *, audit_log: bool = False) -> None:
    assert model.last_step() is None
    assert model.train_steps() == []
    assert model.latest_trained_version() == 0
    assert model.training_rollouts_by_status() == {}
    assert model.training_rollouts_by_scaffold() == {}
    assert model.rollout_count() == 0
    assert model.rollout_times() == RolloutTimes(None, None, None)
    assert model.training_rewards() == []
    assert model.recent_training_rewards(50) == []
    assert model.training_rollouts_finished_between(0.0, 1e12) == 0
    assert model.training_group_counts() == GroupCounts(0, 0, 0)
    assert model.dropped_groups_by_reason() == {}
    assert model.pass_rate_by_step() == []
    assert model.last_reward_by_step() == {}
    assert list(model.served_calls(0.0)) == []
    assert model.serving_pin() is None
    assert model.operator_actions(20) == ([] if audit_log else None)


def _writers(run: Path, implementation: Implementation, *parts: Callable[[TrajectoryStore], object]) -> None:
    store = implementation.open_store(run)
    for part in parts:
        part(store)
    store.close()


@pytest.mark.parametrize("written", ["nothing", "store", "store and ledger", "store, ledger and controls"])
def test_a_run_with_nothing_of_a_kind_yet_reads_as_empty(run_root, implementation, written):
    run = run_root / "run"
    run.mkdir()
    if written != "nothing":
        parts = {"store": (), "store and ledger": (RunLedger,),
                 "store, ledger and controls": (RunLedger, RunControls)}[written]
        _writers(run, implementation, *parts)
    with implementation.open_read_model(run) as model:
        assert model.exists() == (written != "nothing")
        # every store has the audit log's tables since layout 3 (only older stores lack them)
        _assert_empty(model, audit_log=written != "nothing")


def test_a_model_opened_before_the_store_reads_it_once_it_appears(run_root, implementation, clock):
    run = run_root / "run"
    run.mkdir()
    model = implementation.open_read_model(run)
    try:
        assert not model.exists() and model.latest_trained_version() == 0
        _build_run(run, implementation, clock)
        assert model.exists() and model.latest_trained_version() == 2
    finally:
        model.close()
    model.close()  # closing twice is harmless


def test_a_missing_run_folder_reads_as_empty(run_root, implementation):
    with implementation.open_read_model(run_root / "never-created") as model:
        assert not model.exists()
        _assert_empty(model)


def test_reading_beside_a_live_writer(run_root, implementation, clock):
    """Watchers read while the writers hold the store open (a live run)."""
    run = run_root / "run"
    store = implementation.open_store(run)
    ledger = RunLedger(store)
    clock.now = 10.0
    group = ledger.open_group("a", 1)
    ledger.start_rollout("s", group, scaffold="builtin")
    try:
        with implementation.open_read_model(run) as model:
            assert model.training_rollouts_by_status() == {"running": 1}
            clock.now = 20.0
            ledger.finish_rollout("s", 1.0)
            assert model.training_rollouts_by_status() == {"done": 1}  # a held model sees new writes
            assert model.training_group_counts() == GroupCounts(waiting=1)
    finally:
        store.close()

