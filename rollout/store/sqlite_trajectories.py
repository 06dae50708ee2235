"""The trajectory store: sessions, calls and their tries in one SQLite file (WAL).

Recording a call is one transaction: the trie nodes it adds or splits and the call row commit
together, so after ``record_call`` returns the call survives a ``kill -9`` of the process
(WAL with ``synchronous=NORMAL`` is durable against process crashes; pass
``synchronous="FULL"`` to also survive a power cut, at an fsync per call).

Token ids are stored as little-endian int32 blobs, logprobs as float32 blobs and policy
versions as int64 blobs (versions are 64-bit: ``gateway.admin.MAX_VERSION``): compact, and cheap
to turn back into arrays. Stores written before versions were 64-bit are converted when opened
(``PRAGMA user_version`` says which layout a file has).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..records import CallRecord, StoredCall
from ..trie import InsertResult, Trie, TrieNode

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
    purpose TEXT NOT NULL DEFAULT 'main'
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
"""
NO_PATH = 0  # node_id of a call without token ids (real node ids start at 1)

_CALL_COLUMNS = (
    "id, session_id, seq, dialect, model, status, finish_reason, node_id, prompt_len, completion_len, "
    "completion_logprobs, completion_versions, token_exact, stitched_from, branch_reason, messages, "
    "response_message, tools, tool_calls, request_body, response_body, error, created_at, first_token_at, "
    "finished_at, purpose"
)
# PRAGMA user_version of a store: 1 = policy versions in int64 blobs (0: the int32 of older stores).
STORE_LAYOUT = 1
_INSERT_CALL = f"INSERT INTO calls({_CALL_COLUMNS}) VALUES ({', '.join('?' for _ in _CALL_COLUMNS.split(','))})"


def _ids_blob(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def blob_ids(blob: bytes) -> list[int]:
    out = array("i")
    out.frombytes(blob)
    return out.tolist()


def _versions_blob(versions: list[int]) -> bytes:
    return array("q", versions).tobytes()


def blob_versions(blob: bytes, layout: int = STORE_LAYOUT) -> list[int]:
    """Policy versions from a blob of a store of ``layout`` (``PRAGMA user_version``: 0 was int32)."""
    out = array("q" if layout >= 1 else "i")
    out.frombytes(blob)
    return out.tolist()


def _floats_blob(values: list[float]) -> bytes:
    return array("f", values).tobytes()


def _blob_floats(blob: bytes) -> list[float]:
    out = array("f")
    out.frombytes(blob)
    return out.tolist()


def _key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def read_only(path: str | Path, *, timeout_s: float = 10.0) -> sqlite3.Connection:
    """A read-only connection to a run's store, for watchers in other processes (the live view,
    the report, the supervisor): it never takes the write lock the gateway and workers need."""
    return sqlite3.connect(f"file:{quote(str(Path(path).resolve()))}?mode=ro", uri=True, timeout=timeout_s)


class TrajectoryStore:
    """One run's store. Safe to share between threads; one writer process at a time."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", cached_tries: int = 256):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._lock = threading.RLock()
        # Tries of recently active sessions, kept in memory (about 40 bytes a token); the rest
        # are reloaded from disk when their session comes back.
        self._tries: OrderedDict[str, Trie] = OrderedDict()
        self._cached_tries = cached_tries
        self._known_sessions: set[str] = set()  # rows already written by this process
        self._next_seq: dict[str, int] = {}
        row = self._db.execute("SELECT COALESCE(MAX(id), 0), COUNT(*), COALESCE(SUM(LENGTH(tokens)), 0) FROM nodes")
        max_id, self.total_nodes, token_bytes = row.fetchone()
        self.total_tokens = token_bytes // 4
        self._node_ids = iter(range(max_id + 1, 1 << 62))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        """Bring a store written by an older arborl up to this schema (columns only ever added)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(calls)")}
        if "purpose" not in columns:
            self._db.execute("ALTER TABLE calls ADD COLUMN purpose TEXT NOT NULL DEFAULT 'main'")
        layout = self._db.execute("PRAGMA user_version").fetchone()[0]
        if layout > STORE_LAYOUT:
            raise RuntimeError(f"{self.path} was written by a newer arborl (store layout {layout}); upgrade arborl")
        if layout < STORE_LAYOUT:  # int32 policy versions -> int64, in one transaction
            self._db.execute("BEGIN IMMEDIATE")
            # Read again under the write lock: another process may have converted it meanwhile.
            if self._db.execute("PRAGMA user_version").fetchone()[0] < STORE_LAYOUT:
                rows = self._db.execute("SELECT id, completion_versions FROM calls").fetchall()
                self._db.executemany("UPDATE calls SET completion_versions = ? WHERE id = ?",
                                     [(_versions_blob(blob_ids(blob)), call_id) for call_id, blob in rows])
                self._db.execute(f"PRAGMA user_version = {STORE_LAYOUT}")
            self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): everything in it commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def create_tables(self, schema: str) -> None:
        """Other parts of the run (the ledger, the operator controls) keep their tables here too."""
        with self.transaction() as db:
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one read (other parts of the run, such as the rollout ledger, keep tables here too)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- sessions --------------------------------------------------------------------------

    def ensure_session(self, session_id: str, *, identified_by: str = "", scaffold: str | None = None) -> None:
        """Create the session row once; later calls of a known session write nothing."""
        if session_id in self._known_sessions:
            return
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO sessions(id, created_at, identified_by, scaffold) VALUES (?, ?, ?, ?)",
                (session_id, time.time(), identified_by, scaffold),
            )
            self._known_sessions.add(session_id)

    def sessions(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.id, s.created_at, s.identified_by, s.scaffold, "
                "(SELECT COUNT(*) FROM calls c WHERE c.session_id = s.id), "
                "(SELECT COUNT(*) FROM refused_requests r WHERE r.session_id = s.id) "
                "FROM sessions s ORDER BY s.created_at"
            ).fetchall()
        keys = ("id", "created_at", "identified_by", "scaffold", "calls", "refused")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def refusals(self, session_id: str) -> list[tuple[float, str]]:
        """(when, why) of the session's requests refused before any token."""
        with self._lock:
            return self._db.execute(
                "SELECT at, reason FROM refused_requests WHERE session_id = ? ORDER BY at", (session_id,)
            ).fetchall()

    def record_refusal(self, session_id: str, reason: str) -> None:
        """A request of the session the gateway refused before any token (its prompt does not fit
        the model's context): no call to record, but the session did ask the model."""
        with self.transaction() as db:
            db.execute("INSERT INTO refused_requests(session_id, at, reason) VALUES (?, ?, ?)",
                       (session_id, time.time(), reason))

    def issue_session_key(self, session_id: str) -> str:
        """A new API key that identifies ``session_id`` (for orchestrated rollouts)."""
        key = "sk-arborl-" + secrets.token_urlsafe(24)
        self.ensure_session(session_id, identified_by="session_key")
        with self._lock:
            self._db.execute(
                "INSERT INTO session_keys(key_hash, session_id, created_at) VALUES (?, ?, ?)",
                (_key_hash(key), session_id, time.time()),
            )
        return key

    def session_for_key(self, api_key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT session_id FROM session_keys WHERE key_hash = ?", (_key_hash(api_key),)
            ).fetchone()
        return row[0] if row else None

    # -- tries and calls ---------------------------------------------------------------------

    def trie(self, session_id: str) -> Trie:
        """The session's trie, loaded from disk the first time (so a restart continues it)."""
        with self._lock:
            trie = self._tries.get(session_id)
            if trie is not None:
                self._tries.move_to_end(session_id)
            else:
                rows = self._db.execute(
                    "SELECT id, parent_id, start, tokens FROM nodes WHERE session_id = ? ORDER BY id",
                    (session_id,),
                ).fetchall()
                nodes = [TrieNode(nid, parent, start, blob_ids(blob)) for nid, parent, start, blob in rows]
                trie = Trie(nodes, next_id=lambda: next(self._node_ids))
                self._tries[session_id] = trie
                while len(self._tries) > self._cached_tries:
                    self._tries.popitem(last=False)
            return trie

    def record_call(self, call: CallRecord) -> InsertResult:
        """Insert the call's path into its session trie and store the call, durably."""
        if len(call.completion_logprobs) != len(call.completion_ids) or len(call.completion_versions) != len(
            call.completion_ids
        ):
            raise ValueError("completion ids, logprobs and versions must have the same length")
        with self._lock:
            trie = self.trie(call.session_id)
            # A call with no token ids (an upstream engine without a tokenizer) has no trie path.
            path = call.prompt_ids + call.completion_ids
            inserted = trie.insert(path) if path else InsertResult(NO_PATH, 0, [], [])
            seq = self._seq(call.session_id)
            try:
                with self.transaction() as db:
                    db.execute(
                        "INSERT OR IGNORE INTO sessions(id, created_at, identified_by) VALUES (?, ?, '')",
                        (call.session_id, call.created_at),
                    )
                    db.executemany(
                        "INSERT INTO nodes(id, session_id, parent_id, start, tokens) VALUES (?, ?, ?, ?, ?)",
                        [(n.id, call.session_id, n.parent, n.start, _ids_blob(n.tokens)) for n in inserted.created],
                    )
                    db.executemany(
                        "UPDATE nodes SET parent_id = ?, start = ?, tokens = ? WHERE id = ?",
                        [(n.parent, n.start, _ids_blob(n.tokens), n.id) for n in inserted.changed],
                    )
                    db.execute(
                        _INSERT_CALL,
                        (
                            call.id, call.session_id, seq, call.dialect, call.model, call.status,
                            call.finish_reason, inserted.leaf, len(call.prompt_ids), len(call.completion_ids),
                            _floats_blob(call.completion_logprobs), _versions_blob(call.completion_versions),
                            int(call.token_exact), call.stitched_from, call.branch_reason,
                            json.dumps(call.messages), json.dumps(call.response_message),
                            json.dumps(call.tools) if call.tools is not None else None,
                            json.dumps(call.tool_calls) if call.tool_calls is not None else None,
                            call.request_body, call.response_body, call.error,
                            call.created_at, call.first_token_at, call.finished_at, call.purpose,
                        ),
                    )
            except BaseException:
                # The in-memory trie already changed: drop it so it is reloaded from what committed.
                self._tries.pop(call.session_id, None)
                self._next_seq.pop(call.session_id, None)
                raise
            self._next_seq[call.session_id] = seq + 1
            self.total_nodes += len(inserted.created)
            self.total_tokens += len(call.prompt_ids) + len(call.completion_ids) - inserted.shared
            return inserted

    def _seq(self, session_id: str) -> int:
        if session_id not in self._next_seq:
            row = self._db.execute("SELECT COALESCE(MAX(seq), -1) FROM calls WHERE session_id = ?", (session_id,))
            self._next_seq[session_id] = row.fetchone()[0] + 1
        return self._next_seq[session_id]

    def calls(self, session_id: str) -> list[StoredCall]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, session_id, seq, dialect, status, finish_reason, node_id, prompt_len, completion_len, "
                "completion_logprobs, completion_versions, messages, response_message, token_exact, "
                "stitched_from, branch_reason, created_at, finished_at, purpose "
                "FROM calls WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        return [
            StoredCall(
                id=r[0], session_id=r[1], seq=r[2], dialect=r[3], status=r[4], finish_reason=r[5], node_id=r[6],
                prompt_len=r[7], completion_len=r[8], completion_logprobs=_blob_floats(r[9]),
                completion_versions=blob_versions(r[10]), messages=json.loads(r[11] or "[]"),
                response_message=json.loads(r[12]) if r[12] else None, token_exact=bool(r[13]),
                stitched_from=r[14], branch_reason=r[15], created_at=r[16], finished_at=r[17],
                purpose=r[18],
            )
            for r in rows
        ]

    def call_tokens(self, call: StoredCall) -> tuple[list[int], list[int]]:
        """The exact (prompt ids, completion ids) of a stored call, read from its trie path."""
        if call.node_id == NO_PATH:
            return [], []
        path = self.trie(call.session_id).path(call.node_id)
        assert len(path) == call.prompt_len + call.completion_len
        return path[: call.prompt_len], path[call.prompt_len :]

    def call_bodies(self, call_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute(
                "SELECT request_body, response_body, tools, tool_calls, error FROM calls WHERE id = ?", (call_id,)
            ).fetchone()
        if row is None:
            raise KeyError(call_id)
        return {
            "request_body": row[0],
            "response_body": row[1],
            "tools": json.loads(row[2]) if row[2] else None,
            "tool_calls": json.loads(row[3]) if row[3] else None,
            "error": row[4],
        }
