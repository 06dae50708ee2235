"""The store seam (DESIGN.md section 11): everything a run keeps, in one database.

- ``trajectories``: the trajectory store (sessions, calls, their tries, session keys), its logic
  in the SQL SQLite and PostgreSQL both speak; ``sqlite_trajectories`` (one file, WAL: the
  default on one machine) and ``postgres_trajectories`` (a server several gateways share) open
  the database, keep its schema and say where ids come from.
- ``ledger`` (groups, rollouts, feedback, training steps) and ``controls`` (operator controls and
  the audit log) keep their tables in the same database, through the trajectory store's
  transactions, so a step commits atomically with the groups and feedback it consumed.
- ``read_model``: the questions watchers (live view, report, run figures, supervisor) ask about a
  run, as an interface with typed answers; ``sqlite_read_model`` answers them from the SQLite file.

Other modules import from this package, never from its modules. No module outside this package
writes SQL or holds a connection.
"""

from __future__ import annotations

from pathlib import Path

from .controls import KEPT_VERSIONS, LEARNER_OVERRIDES, SERVING_PIN, TRAINING_PAUSED, AdminAction, RunControls
from .ledger import DONE, INFRA_FAILED, RUNNING, CallStats, Feedback, Group, LedgerError, Rollout, RunLedger, StepRecord
from .postgres_trajectories import PostgresTrajectoryStore
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
from .sqlite_read_model import STORE_FILE_NAME, SqliteRunReadModel
from .sqlite_trajectories import SCHEMA, SqliteTrajectoryStore, read_only
from .trajectories import NO_PATH, STORE_LAYOUT, TrajectoryStore, blob_ids, blob_versions

__all__ = [
    "DONE",
    "INFRA_FAILED",
    "KEPT_VERSIONS",
    "LEARNER_OVERRIDES",
    "RUNNING",
    "SERVING_PIN",
    "TRAINING_PAUSED",
    "AdminAction",
    "CallStats",
    "Feedback",
    "Group",
    "LedgerError",
    "Rollout",
    "RunControls",
    "RunLedger",
    "StepRecord",
    "NO_PATH",
    "SCHEMA",
    "STORE_FILE_NAME",
    "STORE_LAYOUT",
    "FinishedReward",
    "GroupCounts",
    "OperatorAction",
    "PostgresTrajectoryStore",
    "RolloutTimes",
    "RunReadModel",
    "ServedCall",
    "SqliteRunReadModel",
    "SqliteTrajectoryStore",
    "StepPassRate",
    "StoreReadError",
    "TrainStep",
    "TrajectoryStore",
    "blob_ids",
    "blob_versions",
    "open_read_model",
    "read_only",
]


def open_read_model(run_dir: str | Path, *, timeout_s: float = 10.0) -> RunReadModel:
    """The read model of the run in ``run_dir``; ``timeout_s``: how long a read waits for a busy store.
    Opening never fails: a run folder with no store yet reads as empty."""
    return SqliteRunReadModel(Path(run_dir) / STORE_FILE_NAME, timeout_s=timeout_s)
