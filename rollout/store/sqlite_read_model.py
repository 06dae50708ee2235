"""The read model of a run whose store is a SQLite file (``RUN/store.sqlite``).

The file is opened read-only (``mode=ro``, see ``read_only``), so a watcher never blocks the
gateway, the workers or the learner writing it. The connection is opened at the first question
and kept until ``close``; a file that does not exist yet is looked for again at every question, so
a model opened before the run's first write starts answering once the store appears.

The ledger's and the controls' tables are created by the first writer that needs them, so any of
them may be missing: every question checks ``sqlite_master`` first and reads a missing table as
empty. ``sqlite3.OperationalError`` (busy past the timeout, a table changed under the reader)
becomes ``StoreReadError``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .read_model import (
    FinishedReward,
    GroupCounts,
    OperatorAction,
    RolloutTimes,
    RunReadModel,
    ServedCall,
    StepPassRate,
    StoreReadError,
    TrainStep,
)
from .sqlite_trajectories import read_only
from .trajectories import blob_versions

STORE_FILE_NAME = "store.sqlite"  # the store's file inside a run folder


def _step(step: int, version: int, created_at: float, metrics: str | None) -> TrainStep:
    try:
        parsed = json.loads(metrics or "{}")
    except ValueError:
        parsed = {}
    return TrainStep(step, version, created_at, parsed if isinstance(parsed, dict) else {})


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreReadError(str(exc)) from exc


class SqliteRunReadModel(RunReadModel):
    def __init__(self, path: str | Path, *, timeout_s: float = 10.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._db: sqlite3.Connection | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- reading ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection | None:
        if self._db is None and self.path.is_file():
            with _translated_errors():
                self._db = read_only(self.path, timeout_s=self.timeout_s)
        return self._db

    def _has_tables(self, *names: str) -> bool:
        """Whether the store exists and has all of these tables (asked at every question: a
        writer may create them while this model is open)."""
        db = self._connection()
        if db is None:
            return False
        with _translated_errors():
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return set(names) <= tables

    def _rows(self, needs: tuple[str, ...], sql: str, args: tuple = ()) -> list[tuple]:
        """The rows of ``sql``; none when the store or one of the tables it ``needs`` is missing."""
        if not self._has_tables(*needs):
            return []
        assert self._db is not None  # opened by _has_tables
        with _translated_errors():
            return self._db.execute(sql, args).fetchall()

    def _training_filter(self) -> str:
        """The condition on ``groups g`` that keeps trainable groups (every group, in stores written
        before groups had the ``trainable`` column)."""
        columns = {row[1] for row in self._rows(("groups",), "PRAGMA table_info(groups)")}
        return "g.trainable = 1" if "trainable" in columns else "1"

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
        rows = self._rows(("groups",), "SELECT SUM(completed_at IS NOT NULL AND consumed_step IS NULL AND dropped IS "
                                       "NULL), SUM(consumed_step IS NOT NULL), SUM(dropped IS NOT NULL) FROM groups g "
                                       f"WHERE {self._training_filter()}")
        if not rows:
            return GroupCounts()
        waiting, trained, dropped = rows[0]
        return GroupCounts(waiting or 0, trained or 0, dropped or 0)

    def dropped_groups_by_reason(self) -> dict[str, int]:
        return dict(self._rows(("groups",), "SELECT dropped, COUNT(*) FROM groups WHERE dropped IS NOT NULL "
                                            "GROUP BY dropped ORDER BY 2 DESC"))

    def pass_rate_by_step(self) -> list[StepPassRate]:
        rows = self._training_rows("g.consumed_step, AVG(COALESCE(r.reward, 0) >= 1)",
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
        db = self._db
        assert db is not None  # opened by _has_tables
        with _translated_errors():
            layout = db.execute("PRAGMA user_version").fetchone()[0]  # how the version blobs are laid out
            cursor = db.execute("SELECT first_token_at, finished_at, completion_versions FROM calls "
                                "WHERE finished_at >= ?", (finished_since,))
        return self._decoded_calls(cursor, layout)

    @staticmethod
    def _decoded_calls(cursor: sqlite3.Cursor, layout: int) -> Iterator[ServedCall]:
        with _translated_errors():
            for first_token_at, finished_at, blob in cursor:
                yield ServedCall(first_token_at, finished_at, blob_versions(blob, layout))

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
