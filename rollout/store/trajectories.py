"""The trajectory store's logic, over any SQL database (DESIGN.md section 2 and section 11).

Recording a call is one transaction: the trie nodes it adds or splits and the call row commit
together, so after ``record_call`` returns the call is durable (what that means is the
database's: SQLite WAL survives a ``kill -9``; PostgreSQL survives the machine).

Token ids are stored as little-endian int32 blobs, logprobs as float32 blobs and policy
versions as int64 blobs (versions are 64-bit: ``gateway.admin.MAX_VERSION``): compact, and cheap
to turn back into arrays. A call's request is stored as a delta against the call it extends
(``call_deltas.py``), and read back whole.

Implementations: ``SqliteTrajectoryStore`` (one file, the default on one machine) and
``PostgresTrajectoryStore`` (a server several gateways share).
"""

from __future__ import annotations

import abc
import hashlib
import json
import secrets
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..records import CallRecord, StoredCall
from ..trie import InsertResult, Trie, TrieNode
from .call_deltas import CallDelta, RecentCalls, WholeCall
from .group_commit import GroupCommitter

SESSION_KEY_PREFIX = "sk-arborl-"  # every key issue_session_key hands out starts so
NO_PATH = 0  # node_id of a call without token ids (real node ids start at 1)

_CALL_COLUMNS = (
    "id, session_id, seq, dialect, model, status, finish_reason, node_id, prompt_len, completion_len, "
    "completion_logprobs, completion_versions, token_exact, stitched_from, branch_reason, messages, "
    "response_message, tools, tool_calls, request_body, response_body, error, created_at, first_token_at, "
    "finished_at, purpose, base_call, messages_kept, tools_kept, request_head, request_tail"
)
# The layout of a store's tables: 3 = the ledger's and the controls' tables are part of the
# schema (groups.trainable always there); 2 = requests stored as deltas (call_deltas.py); 1 = policy
# versions in int64 blobs, every request whole; 0 = the int32 versions of the oldest stores.
STORE_LAYOUT = 3


class StoreUnavailable(RuntimeError):
    """The database cannot be reached now (it went away, or the network did). Nothing was
    written by the operation that raised it; the store reconnects by itself when the database
    is back, so the caller may retry (the gateway answers 503 with Retry-After)."""


_INSERT_CALL = f"INSERT INTO calls({_CALL_COLUMNS}) VALUES ({', '.join('?' for _ in _CALL_COLUMNS.split(','))})"


def _ids_blob(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def blob_ids(blob: bytes) -> list[int]:
    out = array("i")
    out.frombytes(blob)
    return out.tolist()


def versions_blob(versions: list[int]) -> bytes:
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


class TrajectoryStore(abc.ABC):
    """One run's trajectory store: sessions, calls, their tries, session keys, refusals.

    Safe to share between threads. The statements here are the SQL SQLite and PostgreSQL both
    speak (``?`` placeholders; the PostgreSQL connection turns them into ``%s``); a subclass
    opens the connection, keeps the schema and says where node ids come from.
    """

    def __init__(self, db: Any, *, cached_tries: int = 256, commit_batch: int = 64):
        """``db``: an open connection in autocommit mode, its schema current (the subclass's job);
        ``commit_batch``: the most calls one transaction commits together (1: one commit per call)."""
        self._db = db
        self._lock = threading.RLock()
        # Tries of recently active sessions, kept in memory (about 40 bytes a token); the rest
        # are reloaded from the store when their session comes back.
        self._tries: OrderedDict[str, _CachedTrie] = OrderedDict()
        self._cached_tries = cached_tries
        self._known_sessions: set[str] = set()  # rows already written by this process
        self._recent = RecentCalls()
        self._sessions_by_key: dict[str, str] = {}
        row = self._db.execute("SELECT COALESCE(MAX(id), 0), COUNT(*), COALESCE(SUM(LENGTH(tokens)), 0) FROM nodes")
        max_id, self.total_nodes, token_bytes = row.fetchone()
        self.total_tokens = token_bytes // 4
        self._node_ids = self._node_id_source(max_id)
        self._commits: GroupCommitter[CallRecord, InsertResult] = GroupCommitter(
            self._record_batch, max_batch=commit_batch, fatal=(StoreUnavailable,))

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the store is, for messages (a file, or a database with no password in it)."""

    BEGIN = "BEGIN"  # how a write transaction starts (SQLite takes its write lock at once)

    @abc.abstractmethod
    def _node_id_source(self, max_id: int) -> Callable[[], int]:
        """Where new trie node ids come from; ``max_id`` is the largest id stored now."""

    @staticmethod
    def json_field(column: str, field: str) -> str:
        """SQL for the text of ``field`` of the JSON object in ``column`` (both named by code, never
        by a client)."""
        assert column.isidentifier() and field.isidentifier()
        return f"json_extract({column}, '$.{field}')"

    def _lock_session(self, db: Any, session_id: str) -> None:  # noqa: B027 (a no-op unless overridden)
        """Serialise writers of one session inside a transaction (where the database does not already)."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """One write transaction: everything in it commits together or not at all."""
        with self._lock:
            self._db.execute(self.BEGIN)
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    SNAPSHOT = "BEGIN"  # how a read of one consistent snapshot starts

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """One read-only transaction: every read in it sees the store as it was when it began."""
        with self._lock:
            self._db.execute(self.SNAPSHOT)
            try:
                yield self._db
            finally:
                self._db.execute("ROLLBACK")

    def _continue_ids_after(self, db: Any) -> None:  # noqa: B027 (a no-op unless overridden)
        """Inside the transaction ``db`` that wrote rows with their ids (a migration): make the
        ids handed out from now on follow the largest stored ones."""

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one read, for the other parts of the store (the ledger, the controls)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- sessions --------------------------------------------------------------------------

    def ensure_session(self, session_id: str, *, identified_by: str = "", scaffold: str | None = None) -> None:
        """Create the session row once; later calls of a known session write nothing."""
        if session_id in self._known_sessions:
            return
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions(id, created_at, identified_by, scaffold) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
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
        key = SESSION_KEY_PREFIX + secrets.token_urlsafe(24)
        self.ensure_session(session_id, identified_by="session_key")
        with self._lock:
            self._db.execute(
                "INSERT INTO session_keys(key_hash, session_id, created_at) VALUES (?, ?, ?)",
                (_key_hash(key), session_id, time.time()),
            )
        return key

    def session_for_key(self, api_key: str) -> str | None:
        """The session an issued key names, or None. Asked on every request (on the event loop), so
        only keys of arborl's own form are looked up, and a key found is remembered (a key never
        changes session); a key not found is looked up again next time, since another process
        (a rollout worker) may issue it meanwhile."""
        if not api_key.startswith(SESSION_KEY_PREFIX):
            return None
        known = self._sessions_by_key.get(api_key)
        if known is not None:
            return known
        with self._lock:
            row = self._db.execute(
                "SELECT session_id FROM session_keys WHERE key_hash = ?", (_key_hash(api_key),)
            ).fetchone()
        if row is None:
            return None
        if len(self._sessions_by_key) >= 65536:  # bounded: a long run issues a key per rollout
            self._sessions_by_key.clear()
        self._sessions_by_key[api_key] = row[0]
        return row[0]

    # -- tries and calls ---------------------------------------------------------------------

    def trie(self, session_id: str, *, seen_seq: int | None = None) -> Trie:
        """The session's trie, holding at least its calls up to seq ``seen_seq`` (None: every call
        committed now, which costs one indexed read). Kept in memory; reloaded from the store when
        another process (a second gateway, or before a restart) added calls it lacks."""
        with self._lock:
            if seen_seq is None:
                seen_seq = self._committed_seq(self._db, session_id)
            return self._current_trie(self._db, session_id, seen_seq)

    @staticmethod
    def _committed_seq(db: Any, session_id: str) -> int:
        return db.execute("SELECT COALESCE(MAX(seq), -1) FROM calls WHERE session_id = ?", (session_id,)).fetchone()[0]

    def _current_trie(self, db: Any, session_id: str, seen_seq: int) -> Trie:
        """The cached trie if it holds every call up to ``seen_seq``, else read again from ``db``."""
        cached = self._tries.get(session_id)
        if cached is not None and cached.seq >= seen_seq:
            self._tries.move_to_end(session_id)
            return cached.trie
        # The seq first, then the nodes: nodes committed in between make the copy newer than its
        # seq says, never older (the next check reloads it at worst).
        seq = self._committed_seq(db, session_id)
        rows = db.execute(
            "SELECT id, parent_id, start, tokens FROM nodes WHERE session_id = ? ORDER BY id", (session_id,)
        ).fetchall()
        nodes = [TrieNode(nid, parent, start, blob_ids(blob)) for nid, parent, start, blob in rows]
        loaded = _CachedTrie(Trie(nodes, next_id=self._node_ids), seq)
        self._tries[session_id] = loaded
        while len(self._tries) > self._cached_tries:
            self._tries.popitem(last=False)
        return loaded.trie

    def record_call(self, call: CallRecord) -> InsertResult:
        """Insert the call's path into its session trie and store the call, durably.

        The path goes into the trie as committed, under the session's write lock (the copy in
        memory is read again if another process added calls since), so two gateways serving one
        session never store the same prefix twice. Calls recorded at the same moment by several
        threads commit in one transaction (``group_commit.py``): this returns once this call's
        transaction committed."""
        if len(call.completion_logprobs) != len(call.completion_ids) or len(call.completion_versions) != len(
            call.completion_ids
        ):
            raise ValueError("completion ids, logprobs and versions must have the same length")
        return self._commits.submit(call)

    @property
    def record_transactions(self) -> tuple[int, int]:
        """(transactions, calls) ``record_call`` committed so far: calls per transaction above 1
        is group commit at work."""
        return self._commits.batches, self._commits.items

    def _record_batch(self, calls: list[CallRecord]) -> list[InsertResult]:
        """One transaction for ``calls``, in order; then what memory keeps about them."""
        with self._lock:
            done: list[tuple[CallRecord, InsertResult, int, str | None]] = []
            try:
                with self.transaction() as db:
                    for call in calls:
                        # Only what the call adds to an earlier, committed call of its session.
                        delta = self._recent.delta(call)
                        seq, inserted = self._insert_call(db, call, delta)
                        self._tries[call.session_id].seq = seq  # a later call of the batch extends it
                        done.append((call, inserted, seq, delta.base))
            except BaseException:
                # The in-memory tries already changed: drop them so they are reloaded from what committed.
                for call in calls:
                    self._tries.pop(call.session_id, None)
                raise
            for call, inserted, seq, base in done:
                call.seq, call.node_id = seq, inserted.leaf
                self._recent.remember(call, base)
                self.total_nodes += len(inserted.created)
                self.total_tokens += len(call.prompt_ids) + len(call.completion_ids) - inserted.shared
            return [inserted for _, inserted, _, _ in done]

    def _insert_call(self, db: Any, call: CallRecord, delta: CallDelta) -> tuple[int, InsertResult]:
        db.execute(
            "INSERT INTO sessions(id, created_at, identified_by) VALUES (?, ?, '') ON CONFLICT DO NOTHING",
            (call.session_id, call.created_at),
        )
        # The call's place in its session, from what is committed (other processes may record
        # into the session too), under the session's write lock.
        self._lock_session(db, call.session_id)
        seq = self._committed_seq(db, call.session_id) + 1
        trie = self._current_trie(db, call.session_id, seq - 1)
        # A call with no token ids (an upstream engine without a tokenizer) has no trie path.
        path = call.prompt_ids + call.completion_ids
        inserted = trie.insert(path) if path else InsertResult(NO_PATH, 0, [], [])
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
                _floats_blob(call.completion_logprobs), versions_blob(call.completion_versions),
                int(call.token_exact), call.stitched_from, call.branch_reason,
                json.dumps(delta.messages), json.dumps(call.response_message),
                json.dumps(delta.tools) if delta.tools is not None else None,
                json.dumps(call.tool_calls) if call.tool_calls is not None else None,
                delta.request_middle, call.response_body, call.error,
                call.created_at, call.first_token_at, call.finished_at, call.purpose,
                delta.base, delta.messages_kept, int(delta.tools_kept), delta.request_head,
                delta.request_tail,
            ),
        )
        return seq, inserted

    def last_seq(self, session_id: str) -> int:
        """The seq of the session's latest call (-1 before its first): one indexed read, so a
        gateway can tell cheaply whether another process added calls it has not seen."""
        with self._lock:
            return self._committed_seq(self._db, session_id)

    def session_bytes(self, session_id: str) -> int:
        """Bytes the session's calls and trie nodes hold in the store (their columns' contents)."""
        with self._lock:
            calls = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(messages) + LENGTH(COALESCE(response_message, '')) "
                "+ LENGTH(COALESCE(tools, '')) + LENGTH(COALESCE(tool_calls, '')) + LENGTH(request_body) "
                "+ LENGTH(response_body) + LENGTH(completion_logprobs) + LENGTH(completion_versions)), 0) "
                "FROM calls WHERE session_id = ?", (session_id,)).fetchone()[0]
            nodes = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(tokens)), 0) FROM nodes WHERE session_id = ?", (session_id,)
            ).fetchone()[0]
        return calls + nodes

    def calls(self, session_id: str) -> list[StoredCall]:
        """The session's calls in seq order, each with its whole conversation (rebuilt from deltas)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, session_id, seq, dialect, status, finish_reason, node_id, prompt_len, completion_len, "
                "completion_logprobs, completion_versions, messages, response_message, token_exact, "
                "stitched_from, branch_reason, created_at, finished_at, purpose, base_call, messages_kept "
                "FROM calls WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        conversations: dict[str, list[dict[str, Any]]] = {}
        out = []
        for r in rows:
            tail = json.loads(r[11] or "[]")
            base = r[19]
            if base is not None and base not in conversations:
                raise ValueError(f"call {r[0]} is stored against {base}, which is not an earlier call of its session")
            messages = tail if base is None else conversations[base][: r[20]] + tail
            conversations[r[0]] = messages
            out.append(StoredCall(
                id=r[0], session_id=r[1], seq=r[2], dialect=r[3], status=r[4], finish_reason=r[5], node_id=r[6],
                prompt_len=r[7], completion_len=r[8], completion_logprobs=_blob_floats(r[9]),
                completion_versions=blob_versions(r[10]), messages=messages,
                response_message=json.loads(r[12]) if r[12] else None, token_exact=bool(r[13]),
                stitched_from=r[14], branch_reason=r[15], created_at=r[16], finished_at=r[17],
                purpose=r[18],
            ))
        return out

    def call_tokens(self, call: StoredCall) -> tuple[list[int], list[int]]:
        """The exact (prompt ids, completion ids) of a stored call, read from its trie path."""
        if call.node_id == NO_PATH:
            return [], []
        path = self.trie(call.session_id, seen_seq=call.seq).path(call.node_id)
        assert len(path) == call.prompt_len + call.completion_len
        return path[: call.prompt_len], path[call.prompt_len :]

    def call_bodies(self, call_id: str) -> dict[str, Any]:
        """The call's request exactly as the client sent it (rebuilt from its chain of deltas),
        its reply, tools, tool calls and error."""
        with self._lock:
            row = self._db.execute(
                "SELECT session_id, seq, response_body, tool_calls, error FROM calls WHERE id = ?", (call_id,)
            ).fetchone()
            if row is None:
                raise KeyError(call_id)
            chain = self._db.execute(
                "SELECT id, base_call, messages_kept, messages, tools_kept, tools, request_head, request_tail, "
                "request_body FROM calls WHERE session_id = ? AND seq <= ? ORDER BY seq",
                (row[0], row[1]),
            ).fetchall()
        call = _rebuild(call_id, chain)
        return {
            "request_body": call.request_body,
            "response_body": row[2],
            "tools": call.tools,
            "tool_calls": json.loads(row[3]) if row[3] else None,
            "error": row[4],
        }


@dataclass
class _CachedTrie:
    trie: Trie
    seq: int  # the session's calls up to this seq are in it


def _rebuild(call_id: str, rows: list[tuple]) -> WholeCall:
    """``call_id`` whole, from the rows of its session up to it in seq order (bases come first).
    Only the calls on its chain of bases are rebuilt."""
    by_id = {r[0]: r for r in rows}
    chain = [by_id[call_id]]
    while chain[-1][1] is not None:
        chain.append(by_id[chain[-1][1]])
    rebuilt: WholeCall | None = None
    for cid, base, kept, messages, tools_kept, tools, head, tail, body in reversed(chain):
        delta = CallDelta(base, kept, json.loads(messages or "[]"), bool(tools_kept),
                          json.loads(tools) if tools else None, head, tail, body or "")
        rebuilt = delta.rebuild(cid, rebuilt)
    assert rebuilt is not None
    return rebuilt
