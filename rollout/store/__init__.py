"""The store seam (DESIGN.md section 11): everything a run keeps, in one database.

- ``trajectories``: the trajectory store (sessions, calls, their tries, session keys), its logic
  in the SQL SQLite and PostgreSQL both speak; ``sqlite_trajectories`` (one file, WAL: the
  default on one machine) and ``postgres_trajectories`` (a server several gateways share) open
  the database, keep its schema and say where ids come from.
- ``ledger`` (groups, rollouts, feedback, training steps) and ``controls`` (operator controls and
  the audit log) keep their tables in the same database, through the trajectory store's
  transactions, so a step commits atomically with the groups and feedback it consumed.
- ``migrate``: copies every row of one store into an empty other (``arborl store migrate``).
- ``read_model``: the questions watchers (live view, report, run figures, supervisor) ask about a
  run, as an interface with typed answers; ``sql_read_model`` asks them in shared SQL, and
  ``sqlite_read_model`` and ``postgres_read_model`` open the database read-only.

``open_store`` and ``open_read_model`` pick the implementation from the store URL: empty for the
run folder's SQLite file, ``postgresql://...`` for a database server.

Other modules import from this package, never from its modules. No module outside this package
writes SQL or holds a connection.
"""

from __future__ import annotations

from pathlib import Path

from .controls import KEPT_VERSIONS, LEARNER_OVERRIDES, SERVING_PIN, TRAINING_PAUSED, AdminAction, RunControls
from .ledger import DONE, INFRA_FAILED, RUNNING, CallStats, Feedback, Group, LedgerError, Rollout, RunLedger, StepRecord
from .migrate import MigrationError, TableCopy, migrate_store
from .postgres_read_model import PostgresRunReadModel
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
from .trajectories import (
    NO_PATH,
    SESSION_KEY_PREFIX,
    STORE_LAYOUT,
    StoreUnavailable,
    TrajectoryStore,
    blob_ids,
    blob_versions,
)

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
    "MigrationError",
    "Rollout",
    "RunControls",
    "RunLedger",
    "StepRecord",
    "NO_PATH",
    "SCHEMA",
    "SESSION_KEY_PREFIX",
    "STORE_FILE_NAME",
    "STORE_LAYOUT",
    "FinishedReward",
    "GroupCounts",
    "OperatorAction",
    "PostgresRunReadModel",
    "PostgresTrajectoryStore",
    "RolloutTimes",
    "RunReadModel",
    "ServedCall",
    "SqliteRunReadModel",
    "SqliteTrajectoryStore",
    "StepPassRate",
    "StoreReadError",
    "StoreUnavailable",
    "TableCopy",
    "TrainStep",
    "TrajectoryStore",
    "blob_ids",
    "blob_versions",
    "DATABASE_SCHEMES",
    "check_store_url",
    "migrate_store",
    "open_store",
    "open_read_model",
    "read_only",
]


DATABASE_SCHEMES = ("postgresql://", "postgres://")


def check_store_url(url: str) -> None:
    """Refuse a store URL arborl cannot open, with a message naming what it can."""
    if url and not url.startswith(DATABASE_SCHEMES):
        raise ValueError(f"a store URL starts with postgresql:// (or is empty: the run folder's "
                         f"{STORE_FILE_NAME}); got {url.split('://', 1)[0]!r}://...")


def open_store(url: str, run_dir: str | Path, *, synchronous: str = "NORMAL") -> TrajectoryStore:
    """The run's store: the PostgreSQL database ``url`` names, or (``url`` empty) the SQLite file in
    ``run_dir``. ``synchronous`` is SQLite's (PostgreSQL's commits are durable on their own)."""
    check_store_url(url)
    if url:
        return PostgresTrajectoryStore(url)
    return SqliteTrajectoryStore(Path(run_dir) / STORE_FILE_NAME, synchronous=synchronous)


def open_read_model(run_dir: str | Path, *, store_url: str = "", timeout_s: float = 10.0) -> RunReadModel:
    """The read model of the run in ``run_dir`` (or in the database ``store_url``); ``timeout_s``: how
    long a read waits for a busy store. Opening never fails: a run with no store yet reads as empty."""
    check_store_url(store_url)
    if store_url:
        return PostgresRunReadModel(store_url, timeout_s=timeout_s)
    return SqliteRunReadModel(Path(run_dir) / STORE_FILE_NAME, timeout_s=timeout_s)
