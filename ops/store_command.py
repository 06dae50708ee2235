"""``arborl store migrate SRC DST``: copy a run's store into another database, ids and all.

    arborl store migrate runs/default postgresql://arborl@db:5432/arborl   one machine -> a shared server
    arborl store migrate postgresql://arborl@db:5432/arborl runs/archive   a server -> one SQLite file

Each of SRC and DST is a ``postgresql://`` URL, a run folder (its ``store.sqlite``) or a SQLite
file. DST must be empty. Stop the gateways, workers and learner writing to SRC first: the copy
is one snapshot, and what they write after it is not copied. The run folder's other contents
(checkpoints, logs) stay where they are; point the run's ``store.url`` at DST to go on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from arborl.rollout.store import (
    DATABASE_SCHEMES,
    STORE_FILE_NAME,
    MigrationError,
    SqliteTrajectoryStore,
    TrajectoryStore,
    migrate_store,
    open_store,
)


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="store_command", required=True)
    migrate = commands.add_parser("migrate", help="copy every row of SRC into the empty store DST, ids and all")
    migrate.add_argument("source", help="postgresql://... URL, run folder or SQLite file to copy from")
    migrate.add_argument("destination", help="postgresql://... URL, run folder or SQLite file to copy into (empty)")


def store_command(args: argparse.Namespace) -> None:
    source = _open(args.source, must_exist=True)
    try:
        destination = _open(args.destination, must_exist=False)
        try:
            started = time.monotonic()
            copied = migrate_store(source, destination, progress=_ProgressLine())
        except MigrationError as exc:
            raise SystemExit(f"arborl: {exc}") from None
        finally:
            destination.close()
    finally:
        source.close()
    print(f"copied {sum(c.rows for c in copied)} rows from {source.location} to {destination.location} "
          f"in {time.monotonic() - started:.1f} s", file=sys.stderr)
    for table in copied:
        print(f"{table.table:18} {table.rows:>10}")


def _open(where: str, *, must_exist: bool) -> TrajectoryStore:
    """The store ``where`` names: a database URL, a run folder or a SQLite file."""
    if where.startswith(DATABASE_SCHEMES):
        try:
            return open_store(where, "")
        except RuntimeError as exc:  # cannot reach it, or a newer arborl wrote it: said plainly
            raise SystemExit(f"arborl: {exc}") from None
    path = Path(where)
    if path.is_dir() or (not path.exists() and not path.suffix):
        path = path / STORE_FILE_NAME
    if must_exist and not path.is_file():
        raise SystemExit(f"arborl: there is no store at {path}")
    return SqliteTrajectoryStore(path)


class _ProgressLine:
    """A line on stderr per table, rewritten as its rows arrive (at most a few times a second)."""

    def __init__(self) -> None:
        self._table, self._shown_at = "", 0.0

    def __call__(self, table: str, rows: int, total: int) -> None:
        now = time.monotonic()
        if table == self._table and rows < total and now - self._shown_at < 0.25:
            return
        self._table, self._shown_at = table, now
        end = "\n" if rows >= total else ""
        print(f"\r{table}: {rows}/{total} rows", end=end, file=sys.stderr, flush=True)
