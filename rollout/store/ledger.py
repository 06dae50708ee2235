"""The run ledger: rollouts, groups and training steps, in the run's store (beside its trajectories).

The orchestrator opens a group of G rollouts for a task, starts each rollout (a session), and
finishes it with a reward, or marks an infrastructure failure (the rollout is retried under a new
session and the failed one is never trained on). When G rollouts of a group have finished, the
group is complete and waits for the learner.

The learner takes complete groups, trains on them, and commits the step: the step's row (its
policy version and checkpoint folder) and the ``consumed_step`` mark of every group it trained on
are written in one transaction. A learner killed at any point therefore either committed the step
(its groups are consumed, its checkpoint is the one to resume from) or did not (its groups are
still pending and the previous checkpoint is the one to resume from): no group is lost or trained
twice. Groups too stale to train on are marked ``dropped`` and counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arborl.scaffold_adapters.base import TRAINABLE_PURPOSES

from ..records import StoredCall
from .trajectories import NO_PATH, TrajectoryStore

RUNNING, DONE, INFRA_FAILED = "running", "done", "infra_failed"


class LedgerError(RuntimeError):
    """A ledger operation that would break its invariants (e.g. consuming a group twice)."""


@dataclass(frozen=True)
class Group:
    id: int
    task_id: str
    size: int
    domain: str
    created_at: float
    completed_at: float | None
    consumed_step: int | None
    dropped: str | None


@dataclass(frozen=True)
class Rollout:
    session_id: str
    group_id: int
    task_id: str
    scaffold: str
    status: str
    reward: float | None
    outcome: str | None


@dataclass(frozen=True)
class StepRecord:
    step: int
    version: int
    checkpoint: str
    created_at: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Feedback:
    """A reward or an accept / reject an operator or the session's own key attached to a session
    (or to one of its calls) after the fact: production traffic's training signal."""

    id: int
    at: float
    who: str
    session_id: str
    call_id: str | None
    reward: float | None
    accept: bool | None
    consumed_step: int | None

    @property
    def value(self) -> float:
        """The reward it stands for: the reward if given, else 1 for accept and 0 for reject."""
        if self.reward is not None:
            return self.reward
        return 1.0 if self.accept else 0.0


@dataclass(frozen=True)
class CallStats:
    """A rollout's model calls. ``calls`` counts those that got an answer (its turns); the time
    and tokens count every call, cancelled ones too: a call the agent cut off at its deadline
    still took the model's time and read its prompt."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    model_s: float
    refused: int = 0  # requests refused before any token (the prompt did not fit the context)
    cancelled: int = 0  # calls the client cut off (a deadline, a stop) before the answer was complete


_GROUP_COLUMNS = "id, task_id, size, domain, created_at, completed_at, consumed_step, dropped"
_ROLLOUT_COLUMNS = "session_id, group_id, task_id, scaffold, status, reward, outcome"


class RunLedger:
    def __init__(self, store: TrajectoryStore):
        """The ledger's tables are part of every store's schema (the implementation creates them)."""
        self.store = store

    # -- the orchestrator's side --------------------------------------------------------------

    def open_group(self, task_id: str, size: int, *, domain: str = "", meta: dict | None = None,
                   trainable: bool = True) -> int:
        """A new group of ``size`` rollouts. An evaluation's groups are opened with
        ``trainable=False``: they complete like any other, and the learner never sees them."""
        if size < 1:
            raise ValueError(f"a group needs at least one rollout, got size {size}")
        with self.store.transaction() as db:
            return int(db.execute(
                "INSERT INTO groups(task_id, size, domain, created_at, meta, trainable) VALUES (?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (task_id, size, domain, time.time(), json.dumps(meta or {}), int(trainable)),
            ).fetchone()[0])

    def start_rollout(self, session_id: str, group_id: int, *, scaffold: str) -> None:
        task_id = self.group(group_id).task_id
        self.store.ensure_session(session_id, identified_by="rollout", scaffold=scaffold)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO rollouts(session_id, group_id, task_id, scaffold, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, group_id, task_id, scaffold, RUNNING, time.time()),
            )

    def finish_rollout(self, session_id: str, reward: float, *, outcome: str = "") -> bool:
        """Record the rollout's reward; returns True when this completed its group."""
        now = time.time()
        with self.store.transaction() as db:
            row = db.execute("SELECT group_id, status FROM rollouts WHERE session_id = ?", (session_id,)).fetchone()
            if row is None or row[1] != RUNNING:
                raise LedgerError(f"rollout {session_id!r} is not running")
            group_id = row[0]
            db.execute(
                "UPDATE rollouts SET status = ?, reward = ?, outcome = ?, finished_at = ? WHERE session_id = ?",
                (DONE, float(reward), outcome, now, session_id),
            )
            done = db.execute(
                "SELECT COUNT(*) FROM rollouts WHERE group_id = ? AND status = ?", (group_id, DONE)
            ).fetchone()[0]
            size = db.execute("SELECT size FROM groups WHERE id = ?", (group_id,)).fetchone()[0]
            if done == size:
                db.execute("UPDATE groups SET completed_at = ? WHERE id = ?", (now, group_id))
                return True
            return False

    def group_by_key(self, key: str, *, fingerprint: str | None = None) -> Group | None:
        """The group an orchestrator plan opened under ``key`` (how a resumed run finds its groups),
        the first one; with ``fingerprint``, the first opened for a plan with that fingerprint (a
        plan whose task, scaffolds, sandbox, model or limits changed has another one)."""
        field = self.store.json_field
        if fingerprint is None:
            rows = self.store.query(
                f"SELECT {_GROUP_COLUMNS} FROM groups WHERE {field('meta', 'key')} = ? ORDER BY id LIMIT 1", (key,))
        else:
            rows = self.store.query(
                f"SELECT {_GROUP_COLUMNS} FROM groups WHERE {field('meta', 'key')} = ? "
                f"AND {field('meta', 'fingerprint')} = ? ORDER BY id LIMIT 1", (key, fingerprint))
        return Group(*rows[0]) if rows else None

    def rollout_outcomes(self, group_id: int, *, status: str = DONE) -> list[str]:
        """The ``outcome`` texts of a group's rollouts with ``status``, oldest first."""
        return [row[0] or "" for row in self.store.query(
            "SELECT outcome FROM rollouts WHERE group_id = ? AND status = ? ORDER BY created_at, session_id",
            (group_id, status),
        )]

    def call_stats(self, session_id: str) -> CallStats:
        """Model calls a rollout made so far (its session and sub-sessions; main and sub-agent
        calls): how many got an answer (a call the client cut off is not a turn), how many were
        cut off, and the tokens and seconds of all of them (see ``CallStats``)."""
        placeholders = ", ".join("?" for _ in TRAINABLE_PURPOSES)
        row = self.store.query(
            "SELECT COALESCE(SUM(CASE WHEN status != 'cancelled' THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(prompt_len), 0), COALESCE(SUM(completion_len), 0), "
            "COALESCE(SUM(COALESCE(finished_at, created_at) - created_at), 0), "
            "COALESCE(SUM(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END), 0) FROM calls "
            f"WHERE (session_id = ? OR (session_id > ? AND session_id < ?)) AND purpose IN ({placeholders})",
            (session_id, session_id + ":", session_id + ";", *sorted(TRAINABLE_PURPOSES)),
        )[0]
        refused = self.store.query(
            "SELECT COUNT(*) FROM refused_requests WHERE session_id = ? OR (session_id > ? AND session_id < ?)",
            (session_id, session_id + ":", session_id + ";"),
        )[0][0]
        return CallStats(int(row[0]), int(row[1]), int(row[2]), float(row[3]), int(refused), cancelled=int(row[4]))

    def fail_rollout(self, session_id: str, error: str) -> None:
        """An infrastructure failure: kept for the record, never trained on, not counted in its group."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE rollouts SET status = ?, error = ?, finished_at = ? WHERE session_id = ? AND status = ?",
                (INFRA_FAILED, error, time.time(), session_id, RUNNING),
            )

    # -- the learner's side -------------------------------------------------------------------

    def group(self, group_id: int) -> Group:
        rows = self.store.query(f"SELECT {_GROUP_COLUMNS} FROM groups WHERE id = ?", (group_id,))
        if not rows:
            raise KeyError(group_id)
        return Group(*rows[0])

    def pending_groups(self) -> list[Group]:
        """Complete training groups no step has consumed or dropped, oldest completion first."""
        rows = self.store.query(
            f"SELECT {_GROUP_COLUMNS} FROM groups WHERE completed_at IS NOT NULL AND consumed_step IS NULL "
            "AND dropped IS NULL AND trainable = 1 ORDER BY completed_at, id"
        )
        return [Group(*row) for row in rows]

    def rollouts(self, group_id: int, *, status: str = DONE) -> list[Rollout]:
        rows = self.store.query(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE group_id = ? AND status = ? ORDER BY created_at, "
            "session_id",
            (group_id, status),
        )
        return [Rollout(*row) for row in rows]

    def training_calls(self, session_id: str) -> list[StoredCall]:
        """The calls of a rollout to train on, in order: its own session and its sub-sessions
        (``{session}:{branch}``, e.g. sub-agents), main and sub-agent calls only, each with exact
        token ids and at least one sampled token. Titles, side calls, failed or cancelled calls and
        re-tokenised upstream calls are kept in the store but never trained on."""
        family = [session_id] + [
            row[0] for row in self.store.query(
                "SELECT id FROM sessions WHERE id > ? AND id < ? ORDER BY created_at, id",
                (session_id + ":", session_id + ";"),  # ';' sorts right after ':'
            )
        ]
        calls = [call for session in family for call in self.store.calls(session)]
        return [
            call for call in calls
            if call.purpose in TRAINABLE_PURPOSES and call.status == "ok" and call.token_exact
            and call.node_id != NO_PATH and call.completion_len > 0
        ]

    def drop_groups(self, group_ids: list[int], reason: str) -> None:
        with self.store.transaction() as db:
            db.executemany(
                "UPDATE groups SET dropped = ? WHERE id = ? AND consumed_step IS NULL", [(reason, g) for g in group_ids]
            )

    # -- feedback on production sessions ------------------------------------------------------

    def add_feedback(self, session_id: str, *, who: str, call_id: str | None = None, reward: float | None = None,
                     accept: bool | None = None) -> Feedback:
        at = time.time()
        with self.store.transaction() as db:
            feedback_id = int(db.execute(
                "INSERT INTO feedback(at, who, session_id, call_id, reward, accept) VALUES (?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (at, who, session_id, call_id, reward, None if accept is None else int(accept)),
            ).fetchone()[0])
            return Feedback(feedback_id, at, who, session_id, call_id, reward, accept, None)

    def pending_feedback(self) -> list[Feedback]:
        rows = self.store.query(
            "SELECT id, at, who, session_id, call_id, reward, accept, consumed_step FROM feedback "
            "WHERE consumed_step IS NULL ORDER BY id"
        )
        return [Feedback(i, at, who, s, c, r, None if a is None else bool(a), step)
                for i, at, who, s, c, r, a, step in rows]

    def skip_feedback(self, feedback_ids: list[int]) -> None:
        """Mark feedback that the configured mode cannot learn from (say, a reject under SFT):
        ``consumed_step`` 0, so it is not read again."""
        with self.store.transaction() as db:
            db.executemany("UPDATE feedback SET consumed_step = 0 WHERE id = ? AND consumed_step IS NULL",
                           [(f,) for f in feedback_ids])

    def is_rollout(self, session_id: str) -> bool:
        return bool(self.store.query("SELECT 1 FROM rollouts WHERE session_id = ?", (session_id,)))

    def commit_step(self, step: int, version: int, checkpoint: str, group_ids: list[int],
                    metrics: dict[str, Any], *, feedback_ids: Sequence[int] = ()) -> None:
        """The step's record and its groups' (and feedback's) consumption, atomically (see the
        module docstring)."""
        with self.store.transaction() as db:
            placeholders = ", ".join("?" for _ in group_ids)
            taken = db.execute(
                f"SELECT id FROM groups WHERE id IN ({placeholders}) AND (consumed_step IS NOT NULL "
                "OR dropped IS NOT NULL OR completed_at IS NULL)",
                tuple(group_ids),
            ).fetchall() if group_ids else []
            if taken:
                raise LedgerError(f"groups {[r[0] for r in taken]} are not pending; step {step} would retrain them")
            if feedback_ids:
                marks = ", ".join("?" for _ in feedback_ids)
                used = db.execute(f"SELECT id FROM feedback WHERE id IN ({marks}) AND consumed_step IS NOT NULL",
                                  tuple(feedback_ids)).fetchall()
                if used:
                    raise LedgerError(f"feedback {[r[0] for r in used]} was trained on already")
                db.executemany("UPDATE feedback SET consumed_step = ? WHERE id = ?", [(step, f) for f in feedback_ids])
            db.execute(
                "INSERT INTO train_steps(step, version, checkpoint, created_at, metrics) VALUES (?, ?, ?, ?, ?)",
                (step, version, checkpoint, time.time(), json.dumps(metrics)),
            )
            db.executemany("UPDATE groups SET consumed_step = ? WHERE id = ?", [(step, g) for g in group_ids])

    def annotate_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Add figures known only after the commit (how long publishing the version took)."""
        with self.store.transaction() as db:
            row = db.execute("SELECT metrics FROM train_steps WHERE step = ?", (step,)).fetchone()
            if row is None:
                raise LedgerError(f"no committed step {step}")
            merged = {**json.loads(row[0] or "{}"), **metrics}
            db.execute("UPDATE train_steps SET metrics = ? WHERE step = ?", (json.dumps(merged), step))

    def last_step(self) -> StepRecord | None:
        rows = self.store.query(
            "SELECT step, version, checkpoint, created_at, metrics FROM train_steps ORDER BY step DESC LIMIT 1"
        )
        if not rows:
            return None
        step, version, checkpoint, created_at, metrics = rows[0]
        return StepRecord(step, version, checkpoint, created_at, json.loads(metrics or "{}"))

    def steps(self, *, last: int | None = None) -> list[StepRecord]:
        """Committed steps in order (only the newest ``last`` of them, if given)."""
        if last is None:
            rows = self.store.query(
                "SELECT step, version, checkpoint, created_at, metrics FROM train_steps ORDER BY step")
        else:
            rows = self.store.query(
                "SELECT * FROM (SELECT step, version, checkpoint, created_at, metrics FROM train_steps "
                "ORDER BY step DESC LIMIT ?) newest ORDER BY step", (last,))
        return [StepRecord(s, v, c, t, json.loads(m or "{}")) for s, v, c, t, m in rows]

    def consumed(self) -> dict[int, int]:
        """group id -> the step that trained on it."""
        return dict(self.store.query("SELECT id, consumed_step FROM groups WHERE consumed_step IS NOT NULL"))
