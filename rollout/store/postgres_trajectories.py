"""The trajectory store in a PostgreSQL database: one store that several gateways share.

psycopg 3 is the driver. The statements are the shared ones of ``trajectories.py``; what differs
from SQLite is here:
- node ids come in blocks of ``NODE_ID_BLOCK`` from a database sequence, one block at a time per
  process, so two writers never hand out the same id;
- a call's seq is taken under a row lock on its session (``SELECT ... FOR UPDATE``), so calls of
  one session recorded by two gateways at once get distinct, increasing seqs (and the unique
  index on (session_id, seq) would refuse a duplicate rather than store it);
- the schema is created under an advisory lock (two processes starting at once), and its layout
  is kept in ``arborl_store``: a database written by a newer arborl is refused.

Not yet here (issue 14, next steps): a connection pool with reconnection, group commit, and
idempotent inserts of a group trie's shared nodes by two gateways at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .trajectories import STORE_LAYOUT, TrajectoryStore

NODE_ID_BLOCK = 1 << 16
_SCHEMA_LOCK = 0x6172626F  # pg_advisory_xact_lock key held while the schema is created ("arbo")

SCHEMA = """
CREATE TABLE IF NOT EXISTS arborl_store (layout INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    identified_by TEXT,
    scaffold TEXT,
    meta TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    id BIGINT PRIMARY KEY,
    session_id TEXT NOT NULL,
    parent_id BIGINT,
    start INTEGER NOT NULL,
    tokens BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_by_session ON nodes(session_id);
CREATE SEQUENCE IF NOT EXISTS node_id_blocks;
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    dialect TEXT NOT NULL,
    model TEXT,
    status TEXT NOT NULL,
    finish_reason TEXT,
    node_id BIGINT NOT NULL,
    prompt_len INTEGER NOT NULL,
    completion_len INTEGER NOT NULL,
    completion_logprobs BYTEA NOT NULL,
    completion_versions BYTEA NOT NULL,
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
    created_at DOUBLE PRECISION NOT NULL,
    first_token_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    purpose TEXT NOT NULL DEFAULT 'main',
    base_call TEXT,
    messages_kept INTEGER NOT NULL DEFAULT 0,
    tools_kept INTEGER NOT NULL DEFAULT 0,
    request_head INTEGER NOT NULL DEFAULT 0,
    request_tail INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS calls_by_session ON calls(session_id, seq);
CREATE TABLE IF NOT EXISTS refused_requests (
    session_id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_keys (
    key_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
)
"""


class _Connection:
    """A psycopg connection (autocommit) that takes the shared statements' ``?`` placeholders."""

    def __init__(self, conn: Any):
        self._conn = conn

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: list) -> None:
        if rows:
            with self._conn.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)

    def close(self) -> None:
        self._conn.close()


def _location(dsn: str) -> str:
    """The DSN without its password, for messages."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    return "postgresql://{user}@{host}:{port}/{dbname}".format(
        user=parts.get("user", ""), host=parts.get("host", ""), port=parts.get("port", ""),
        dbname=parts.get("dbname", ""))


class PostgresTrajectoryStore(TrajectoryStore):
    """One run's store in a PostgreSQL database (``dsn``: ``postgresql://user@host:port/db``)."""

    def __init__(self, dsn: str, *, cached_tries: int = 256, connect_timeout_s: float = 10.0):
        import psycopg

        self.dsn = dsn
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout_s)))
        except psycopg.OperationalError as exc:
            raise RuntimeError(f"cannot reach the store at {_location(dsn)}: {exc}".strip()) from exc
        db = _Connection(conn)
        _prepare(db, _location(dsn))
        super().__init__(db, cached_tries=cached_tries)

    @property
    def location(self) -> str:
        return _location(self.dsn)

    def _node_id_source(self, max_id: int) -> Callable[[], int]:
        # Blocks start past every id stored (a store migrated in keeps its ids).
        self._db.execute("SELECT setval('node_id_blocks', GREATEST((SELECT last_value FROM node_id_blocks), ?))",
                         (max_id // NODE_ID_BLOCK + 1,))
        return self._blocks().__next__

    def _blocks(self) -> Iterator[int]:
        """Ids of one block after another (drawn while a call is recorded, under the store's lock)."""
        while True:
            block = self._db.execute("SELECT nextval('node_id_blocks')").fetchone()[0]
            yield from range(block * NODE_ID_BLOCK, (block + 1) * NODE_ID_BLOCK)

    def _lock_session(self, db: Any, session_id: str) -> None:
        db.execute("SELECT 1 FROM sessions WHERE id = ? FOR UPDATE", (session_id,))


def _prepare(db: _Connection, location: str) -> None:
    """Create the schema if missing (one process at a time), and refuse a newer layout."""
    db.execute("BEGIN")
    try:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT MAX(layout) FROM arborl_store").fetchone()
        if row[0] is None:
            db.execute("INSERT INTO arborl_store(layout) VALUES (?)", (STORE_LAYOUT,))
        elif row[0] > STORE_LAYOUT:
            raise RuntimeError(f"{location} was written by a newer arborl (store layout {row[0]}); upgrade arborl")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
