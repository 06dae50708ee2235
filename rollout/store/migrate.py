"""Copy a run's store into another database: ``arborl store migrate SRC DST``.

A run started on the embedded SQLite file moves to PostgreSQL (to add a second gateway), or
back to one file (to archive it, or to look at it on a laptop), with nothing lost:

- every row of every table arrives as it was, ids included (trie node ids, call ids, group,
  feedback and audit-log ids, step numbers), so everything that points at an id still does;
- the source is read in one snapshot, so the copy is consistent even while something still
  reads or writes it (what is written after the snapshot is not copied: stop the writers first);
- the destination must hold no rows, and the copy is one transaction on it: a migration that
  fails leaves it empty, ready to run again; row counts are compared before it commits;
- afterwards the destination hands out ids past every copied one (``_continue_ids_after``:
  PostgreSQL's identity sequences and node-id blocks are set past the largest id; SQLite's
  AUTOINCREMENT follows inserted ids by itself).

The statements are the SQL both databases speak; the copy reads and writes in batches keyed
by each table's primary key, so memory stays flat whatever the store's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .trajectories import StoreUnavailable, TrajectoryStore

# Every table a store keeps, with the column a copy pages through (its primary key), in the
# order they are copied. refused_requests has no key: a small table, copied in one read.
TABLES: tuple[tuple[str, str | None], ...] = (
    ("sessions", "id"),
    ("nodes", "id"),
    ("calls", "id"),
    ("refused_requests", None),
    ("session_keys", "key_hash"),
    ("groups", "id"),
    ("rollouts", "session_id"),
    ("feedback", "id"),
    ("train_steps", "step"),
    ("controls", "key"),
    ("admin_actions", "id"),
)
BATCH_ROWS = 500

Progress = Callable[[str, int, int], None]  # (table, rows copied so far, rows in the table)


class MigrationError(RuntimeError):
    """The migration cannot run (the destination holds rows) or did not copy every row."""


@dataclass(frozen=True)
class TableCopy:
    table: str
    rows: int


def migrate_store(source: TrajectoryStore, destination: TrajectoryStore, *,
                  progress: Progress | None = None) -> list[TableCopy]:
    """Copy every row of ``source`` into the empty store ``destination``; returns the rows per table.

    Raises ``MigrationError`` (nothing written) when ``destination`` holds any row."""
    occupied = [table for table, _ in TABLES if _count(destination, table)]
    if occupied:
        raise MigrationError(f"{destination.location} is not empty (it has rows in {', '.join(occupied)}); "
                             "migrate into a new database or file")
    copied: list[TableCopy] = []
    with source.snapshot() as reader, destination.transaction() as writer:
        for table, key in TABLES:
            total = reader.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            rows = 0
            for columns, batch in _batches(reader, table, key):
                try:
                    writer.executemany(f"INSERT INTO {table}({', '.join(columns)}) "
                                       f"VALUES ({', '.join('?' for _ in columns)})", batch)
                except StoreUnavailable:
                    raise
                except Exception as exc:  # the database's own refusal (a value of the wrong type)
                    raise MigrationError(f"{table}: {destination.location} refused a row of rows "
                                         f"{rows + 1}-{rows + len(batch)}: {exc}") from exc
                rows += len(batch)
                if progress is not None:
                    progress(table, rows, total)
            arrived = writer.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            if not rows == arrived == total:
                raise MigrationError(f"{table}: {total} rows in the source, {rows} read, {arrived} written")
            copied.append(TableCopy(table, rows))
        destination._continue_ids_after(writer)
    return copied


def _batches(reader: Any, table: str, key: str | None):
    """(column names, rows) of ``table`` in batches, in the order of ``key``."""
    if key is None:
        cursor = reader.execute(f"SELECT * FROM {table}")
        rows = cursor.fetchall()
        if rows:
            yield [d[0] for d in cursor.description], [tuple(row) for row in rows]
        return
    cursor = reader.execute(f"SELECT * FROM {table} ORDER BY {key} LIMIT ?", (BATCH_ROWS,))
    while True:
        columns = [d[0] for d in cursor.description]
        rows = [tuple(row) for row in cursor.fetchall()]
        if not rows:
            return
        yield columns, rows
        if len(rows) < BATCH_ROWS:
            return
        last = rows[-1][columns.index(key)]
        cursor = reader.execute(f"SELECT * FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?", (last, BATCH_ROWS))


def _count(store: TrajectoryStore, table: str) -> int:
    return int(store.query(f"SELECT COUNT(*) FROM {table}")[0][0])
