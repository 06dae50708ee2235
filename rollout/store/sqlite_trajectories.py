"""The trajectory store in one SQLite file (WAL): the default on one machine.

WAL with ``synchronous=NORMAL`` makes a committed call durable against a crash of the process
(pass ``synchronous="FULL"`` to also survive a power cut, at an fsync per call). One writer
process at a time; readers in other processes use ``read_only``. ``PRAGMA user_version`` says
which layout a file has; older files are converted when opened, newer ones refused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from itertools import count
from pathlib import Path
from urllib.parse import quote

from .trajectories import STORE_LAYOUT, TrajectoryStore, blob_ids, versions_blob

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    identified_by TEXT,
    scaffold TEXT,
    meta TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    parent_id INTEGER,
    start INTEGER NOT NULL,
    tokens BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_by_session ON nodes(session_id);
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    dialect TEXT NOT NULL,
    model TEXT,
    status TEXT NOT NULL,
    finish_reason TEXT,
    node_id INTEGER NOT NULL,
    prompt_len INTEGER NOT NULL,
    completion_len INTEGER NOT NULL,
    completion_logprobs BLOB NOT NULL,
    completion_versions BLOB NOT NULL,
    token_exact INTEGER NOT NULL,
    stitched_from TEXT,
    branch_reason TEXT,
    messages TEXT,
    response_message TEXT,
    tools TEXT,
    tool_calls TEXT,
    request_body TEXT,
    response_body TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    first_token_at REAL,
    finished_at REAL,
    purpose TEXT NOT NULL DEFAULT 'main',
    base_call TEXT,
    messages_kept INTEGER NOT NULL DEFAULT 0,
    tools_kept INTEGER NOT NULL DEFAULT 0,
    request_head INTEGER NOT NULL DEFAULT 0,
    request_tail INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS calls_by_session ON calls(session_id, seq);
CREATE TABLE IF NOT EXISTS refused_requests (
    session_id TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_keys (
    key_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    created_at REAL NOT NULL
);
-- the run ledger (ledger.py)
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    domain TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    completed_at REAL,
    consumed_step INTEGER,
    dropped TEXT,
    meta TEXT,
    trainable INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS rollouts (
    session_id TEXT PRIMARY KEY,
    group_id INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    scaffold TEXT NOT NULL,
    status TEXT NOT NULL,
    reward REAL,
    outcome TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS rollouts_by_group ON rollouts(group_id, status);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    session_id TEXT NOT NULL,
    call_id TEXT,
    reward REAL,
    accept INTEGER,
    consumed_step INTEGER
);
CREATE TABLE IF NOT EXISTS train_steps (
    step INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    checkpoint TEXT NOT NULL,
    created_at REAL NOT NULL,
    metrics TEXT
);
-- the operator controls (controls.py)
CREATE TABLE IF NOT EXISTS controls (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL
);
"""
_DELTA_COLUMNS = {  # added by layout 2; a row without a base is a whole request, as before
    "base_call": "TEXT", "messages_kept": "INTEGER NOT NULL DEFAULT 0", "tools_kept": "INTEGER NOT NULL DEFAULT 0",
    "request_head": "INTEGER NOT NULL DEFAULT 0", "request_tail": "INTEGER NOT NULL DEFAULT 0",
}


def read_only(path: str | Path, *, timeout_s: float = 10.0) -> sqlite3.Connection:
    """A read-only connection to a run's store, for watchers in other processes (the live view,
    the report, the supervisor): it never takes the write lock the gateway and workers need."""
    return sqlite3.connect(f"file:{quote(str(Path(path).resolve()))}?mode=ro", uri=True, timeout=timeout_s)


class SqliteTrajectoryStore(TrajectoryStore):
    """One run's store in one SQLite file."""

    BEGIN = "BEGIN IMMEDIATE"  # take the write lock now, not at the first write (no deadlock on upgrade)

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", cached_tries: int = 256,
                 commit_batch: int = 64):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(SCHEMA)
        _migrate(db, self.path)
        super().__init__(db, cached_tries=cached_tries, commit_batch=commit_batch)

    @property
    def location(self) -> str:
        return str(self.path)

    def _node_id_source(self, max_id: int) -> Callable[[], int]:
        # One writer process: ids counted on from the largest stored.
        return count(max_id + 1).__next__


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring a store written by an older arborl up to this layout (columns only ever added)."""
    layout = db.execute("PRAGMA user_version").fetchone()[0]
    if layout > STORE_LAYOUT:
        raise RuntimeError(f"{path} was written by a newer arborl (store layout {layout}); upgrade arborl")
    if layout == STORE_LAYOUT:
        return
    db.execute("BEGIN IMMEDIATE")  # one transaction: converted wholly or not at all
    try:
        # Read again under the write lock: another process may have converted it meanwhile.
        layout = db.execute("PRAGMA user_version").fetchone()[0]
        columns = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
        if "purpose" not in columns:
            db.execute("ALTER TABLE calls ADD COLUMN purpose TEXT NOT NULL DEFAULT 'main'")
        for name, kind in _DELTA_COLUMNS.items():
            if name not in columns:
                db.execute(f"ALTER TABLE calls ADD COLUMN {name} {kind}")
        # a ledger written before evaluation groups existed: every group was a training group
        if "trainable" not in {row[1] for row in db.execute("PRAGMA table_info(groups)")}:
            db.execute("ALTER TABLE groups ADD COLUMN trainable INTEGER NOT NULL DEFAULT 1")
        if layout < 1:  # int32 policy versions -> int64
            rows = db.execute("SELECT id, completion_versions FROM calls").fetchall()
            db.executemany("UPDATE calls SET completion_versions = ? WHERE id = ?",
                           [(versions_blob(blob_ids(blob)), call_id) for call_id, blob in rows])
        db.execute(f"PRAGMA user_version = {STORE_LAYOUT}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
