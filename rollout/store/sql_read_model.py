"""The read model's questions in the SQL SQLite and PostgreSQL both speak.

``SqlRunReadModel`` asks every question of ``RunReadModel``; an implementation opens the
connection (read-only), says which tables exist (a store written by an older arborl may lack
some: a missing table reads as empty), which layout the store has, and turns its driver's errors
into ``StoreReadError``.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterator

from .read_model import (
    FinishedReward,
    GroupCounts,
    OperatorAction,
    RolloutTimes,
    RunReadModel,
    ServedCall,
    StepPassRate,
    TrainStep,
)
from .trajectories import blob_versions


def _step(step: int, version: int, created_at: float, metrics: str | None) -> TrainStep:
    try:
        parsed = json.loads(metrics or "{}")
    except ValueError:
        parsed = {}
    return TrainStep(step, version, created_at, parsed if isinstance(parsed, dict) else {})


class SqlRunReadModel(RunReadModel):
    @abstractmethod
    def _has_tables(self, *names: str) -> bool:
        """Whether the store exists and has all of these tables (asked at every question: a
        writer may create them while this model is open)."""

    @abstractmethod
    def _query(self, sql: str, args: tuple) -> list[tuple]:
        """The rows of one read (``?`` placeholders); the driver's errors as ``StoreReadError``."""

    @abstractmethod
    def _layout(self) -> int:
        """The store's layout (``trajectories.STORE_LAYOUT`` of the arborl that wrote it)."""

    def _training_filter(self) -> str:
        """The condition on ``groups g`` that keeps trainable groups."""
        return "g.trainable = 1"

    def _rows(self, needs: tuple[str, ...], sql: str, args: tuple = ()) -> list[tuple]:
        """The rows of ``sql``; none when the store or one of the tables it ``needs`` is missing."""
        if not self._has_tables(*needs):
            return []
        return self._query(sql, args)

    def _training_rows(self, select: str, where: str = "", args: tuple = ()) -> list[tuple]:
        """``SELECT {select}`` over training rollouts joined with their groups, ``AND {where}``."""
        joined = f"FROM rollouts r JOIN groups g ON g.id = r.group_id WHERE {self._training_filter()}"
        return self._rows(("rollouts", "groups"), f"SELECT {select} {joined}{where}", args)

    # -- training steps -----------------------------------------------------------------------

    def last_step(self) -> TrainStep | None:
        rows = self._rows(("train_steps",),
                          "SELECT step, version, created_at, metrics FROM train_steps ORDER BY step DESC LIMIT 1")
        return _step(*rows[0]) if rows else None

    def train_steps(self) -> list[TrainStep]:
        rows = self._rows(("train_steps",), "SELECT step, version, created_at, metrics FROM train_steps ORDER BY step")
        return [_step(*row) for row in rows]

    def latest_trained_version(self) -> int:
        rows = self._rows(("train_steps",), "SELECT MAX(version) FROM train_steps")
        return (rows[0][0] if rows else None) or 0

    # -- rollouts -----------------------------------------------------------------------------

    def training_rollouts_by_status(self) -> dict[str, int]:
        return dict(self._training_rows("r.status, COUNT(*)", " GROUP BY r.status"))

    def training_rollouts_by_scaffold(self) -> dict[str, int]:
        return dict(self._training_rows("r.scaffold, COUNT(*)", " GROUP BY r.scaffold ORDER BY 2 DESC"))

    def rollout_count(self) -> int:
        rows = self._rows(("rollouts",), "SELECT COUNT(*) FROM rollouts")
        return rows[0][0] if rows else 0

    def rollout_times(self) -> RolloutTimes:
        rows = self._rows(("rollouts",), "SELECT MIN(created_at), MAX(created_at), MAX(finished_at) FROM rollouts")
        return RolloutTimes(*rows[0]) if rows else RolloutTimes()

    def training_rewards(self) -> list[FinishedReward]:
        rows = self._training_rows("r.finished_at, COALESCE(r.reward, 0)",
                                   " AND r.status = 'done' AND r.finished_at IS NOT NULL ORDER BY r.finished_at")
        return [FinishedReward(finished_at, reward) for finished_at, reward in rows]

    def recent_training_rewards(self, limit: int) -> list[float]:
        rows = self._training_rows("r.reward", " AND r.status = 'done' ORDER BY r.finished_at DESC LIMIT ?", (limit,))
        return [reward or 0.0 for (reward,) in rows]

    def training_rollouts_finished_between(self, start: float, end: float) -> int:
        rows = self._training_rows("COUNT(*)", " AND r.status = 'done' AND r.finished_at BETWEEN ? AND ?",
                                   (start, end))
        return rows[0][0] if rows else 0

    # -- groups -------------------------------------------------------------------------------

    def training_group_counts(self) -> GroupCounts:
        rows = self._rows(("groups",), "SELECT SUM(CASE WHEN completed_at IS NOT NULL AND consumed_step IS NULL "
                                       "AND dropped IS NULL THEN 1 ELSE 0 END), "
                                       "SUM(CASE WHEN consumed_step IS NOT NULL THEN 1 ELSE 0 END), "
                                       "SUM(CASE WHEN dropped IS NOT NULL THEN 1 ELSE 0 END) FROM groups g "
                                       f"WHERE {self._training_filter()}")
        if not rows:
            return GroupCounts()
        waiting, trained, dropped = rows[0]
        return GroupCounts(waiting or 0, trained or 0, dropped or 0)

    def dropped_groups_by_reason(self) -> dict[str, int]:
        return dict(self._rows(("groups",), "SELECT dropped, COUNT(*) FROM groups WHERE dropped IS NOT NULL "
                                            "GROUP BY dropped ORDER BY 2 DESC"))

    def pass_rate_by_step(self) -> list[StepPassRate]:
        rows = self._training_rows("g.consumed_step, AVG(CASE WHEN COALESCE(r.reward, 0) >= 1 THEN 1.0 ELSE 0.0 END)",
                                   " AND r.status = 'done' AND g.consumed_step IS NOT NULL "
                                   "GROUP BY g.consumed_step ORDER BY 1")
        return [StepPassRate(step, rate) for step, rate in rows]

    def last_reward_by_step(self) -> dict[int, float | None]:
        return dict(self._rows(("groups",), "SELECT consumed_step, MAX(completed_at) FROM groups "
                                            "WHERE consumed_step IS NOT NULL GROUP BY consumed_step"))

    # -- calls --------------------------------------------------------------------------------

    def served_calls(self, finished_since: float) -> Iterator[ServedCall]:
        if not self._has_tables("calls"):
            return iter(())
        layout = self._layout()  # how the version blobs are laid out
        rows = self._rows(("calls",), "SELECT first_token_at, finished_at, completion_versions FROM calls "
                                      "WHERE finished_at >= ?", (finished_since,))
        return (ServedCall(first, finished, blob_versions(bytes(blob), layout)) for first, finished, blob in rows)

    # -- operator controls --------------------------------------------------------------------

    def serving_pin(self) -> int | None:
        rows = self._rows(("controls",), "SELECT value FROM controls WHERE key = 'serving_pin'")
        return json.loads(rows[0][0]) if rows else None

    def operator_actions(self, last: int) -> list[OperatorAction] | None:
        if not self._has_tables("admin_actions"):
            return None
        rows = self._rows(("admin_actions",), "SELECT at, who, action, details FROM admin_actions "
                                              "ORDER BY id DESC LIMIT ?", (last,))
        return [OperatorAction(*row) for row in rows]
