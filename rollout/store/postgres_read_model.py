"""The read model of a run whose store is a PostgreSQL database.

One connection in autocommit mode with read-only transactions, opened at the first question and
kept until ``close``: each question is a statement of its own, so a watcher never holds a lock a
writer waits for. A database without arborl's tables yet (nothing recorded) reads as empty, and
starts answering once a writer has created them. A database that cannot be reached, or a
statement that fails, is ``StoreReadError``, and the next question connects again.
"""

from __future__ import annotations

from typing import Any

from .postgres_trajectories import location_of
from .read_model import StoreReadError
from .sql_read_model import SqlRunReadModel


class PostgresRunReadModel(SqlRunReadModel):
    def __init__(self, dsn: str, *, timeout_s: float = 10.0):
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._conn: Any = None

    @property
    def location(self) -> str:
        return location_of(self.dsn)

    def exists(self) -> bool:
        return self._has_tables("calls")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, round(self.timeout_s)))
                self._conn.execute("SET default_transaction_read_only = on")
                self._conn.execute(f"SET statement_timeout = {int(self.timeout_s * 1000)}")
            return self._conn.execute(sql.replace("?", "%s"), args).fetchall()
        except psycopg.Error as exc:
            self.close()  # connect again at the next question
            raise StoreReadError(f"{self.location}: {exc}".strip()) from exc

    def _has_tables(self, *names: str) -> bool:
        rows = self._execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        tables = {row[0] for row in rows}
        return set(names) <= tables

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        return self._execute(sql, args)

    def _layout(self) -> int:
        rows = self._execute("SELECT MAX(layout) FROM arborl_store")
        return rows[0][0] or 0
