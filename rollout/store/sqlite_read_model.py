"""The read model of a run whose store is a SQLite file (``RUN/store.sqlite``).

The file is opened read-only (``mode=ro``, see ``read_only``), so a watcher never blocks the
gateway, the workers or the learner writing it. The connection is opened at the first question
and kept until ``close``; a file that does not exist yet is looked for again at every question, so
a model opened before the run's first write starts answering once the store appears.

A store written by an older arborl may lack the ledger's or the controls' tables (they were
created by the first writer that needed them): every question checks ``sqlite_master`` first and
reads a missing table as empty. ``sqlite3.OperationalError`` (busy past the timeout, a table
changed under the reader) becomes ``StoreReadError``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .read_model import StoreReadError
from .sql_read_model import SqlRunReadModel
from .sqlite_trajectories import read_only

STORE_FILE_NAME = "store.sqlite"  # the store's file inside a run folder


@contextmanager
def _translated_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreReadError(str(exc)) from exc


class SqliteRunReadModel(SqlRunReadModel):
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
        db = self._connection()
        if db is None:
            return False
        with _translated_errors():
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return set(names) <= tables

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        assert self._db is not None  # opened by _has_tables
        with _translated_errors():
            return self._db.execute(sql, args).fetchall()

    def _layout(self) -> int:
        rows = self._query("PRAGMA user_version", ())
        return rows[0][0]

    def _training_filter(self) -> str:
        """Every group is a training group in stores written before groups had ``trainable``."""
        columns = {row[1] for row in self._rows(("groups",), "PRAGMA table_info(groups)")}
        return "g.trainable = 1" if "trainable" in columns else "1"
