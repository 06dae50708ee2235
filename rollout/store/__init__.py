"""The store seam (DESIGN.md section 11): a run's trajectories, and the read model watchers use.

- ``sqlite_trajectories``: the typed trajectory store (sessions, calls, their tries) in one
  SQLite file (WAL), the default on one machine.
- ``read_model``: the questions watchers (live view, report, run figures, supervisor) ask about a
  run, as an interface with typed answers; ``sqlite_read_model`` answers them from the SQLite file.

Other modules import from this package, never from its modules, so an implementation can move or
another (PostgreSQL) can join behind the same names. Only store implementations write SQL; the
run ledger and the run controls (``rollout/ledger.py``, ``rollout/controls.py``) still do, through
``TrajectoryStore.query`` and ``transaction``, until they join this package.
"""

from __future__ import annotations

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
from .sqlite_read_model import STORE_FILE_NAME, SqliteRunReadModel
from .sqlite_trajectories import SCHEMA, SqliteTrajectoryStore, read_only
from .trajectories import NO_PATH, STORE_LAYOUT, TrajectoryStore, blob_ids, blob_versions

__all__ = [
    "NO_PATH",
    "SCHEMA",
    "STORE_FILE_NAME",
    "STORE_LAYOUT",
    "FinishedReward",
    "GroupCounts",
    "OperatorAction",
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
