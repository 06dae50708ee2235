"""What a rollout's calls cost, as the ledger adds them up for its result: a call the agent cut
off (the deadline, a stop) took the model's time and read its prompt as much as one that was
answered, so it counts in the time and token figures, though it is not a turn."""

from __future__ import annotations

from arborl.rollout.records import CallRecord
from arborl.rollout.store import RunLedger, SqliteTrajectoryStore, TrajectoryStore


def record(store: TrajectoryStore, call_id: str, *, prompt: int, completion: int, started: float, seconds: float,
           status: str = "ok", purpose: str = "main", session: str = "rollout-1-abc") -> None:
    store.record_call(CallRecord(
        id=call_id, session_id=session, dialect="chat", model="tiny", prompt_ids=list(range(prompt)),
        completion_ids=list(range(completion)), completion_logprobs=[-0.5] * completion,
        completion_versions=[0] * completion, status=status, purpose=purpose, created_at=started,
        finished_at=started + seconds))


def test_a_cancelled_call_counts_in_time_and_tokens_but_not_as_a_turn(tmp_path):
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    try:
        record(store, "answered", prompt=10, completion=5, started=1000.0, seconds=1.0)
        # the agent's deadline cut this one off while the engine was still reading its prompt
        record(store, "cut-off", prompt=2000, completion=0, started=1001.0, seconds=175.0, status="cancelled")
        record(store, "title", prompt=50, completion=3, started=1002.0, seconds=9.0, purpose="title")  # not its work
        stats = RunLedger(store).call_stats("rollout-1-abc")
        assert stats.calls == 1  # turns: calls that got an answer
        assert stats.model_s == 176.0
        assert (stats.prompt_tokens, stats.completion_tokens) == (2010, 5)
        assert stats.cancelled == 1
    finally:
        store.close()
