"""Group commit: the calls that finish while one transaction commits share the next one.

A call must be durable before its last byte is sent, and on PostgreSQL each commit waits for
the write-ahead log to reach the disk (about 2.5 ms, and tens of ms under load), so committing
concurrent calls one by one caps a store at a few hundred calls a second. Here a caller that
finds no commit under way becomes the leader: it writes every item waiting at that moment in
one transaction and hands each waiter its own result. Callers that arrive meanwhile wait (not
holding the store's lock) and are written by the next leader, together.

Invariants:
- ``submit`` returns only after its item committed, or raises what kept it from committing;
- one bad item never fails the others: a batch that fails is written again item by item, and
  only the items that fail alone get the error (a database that is gone fails them all);
- items of one batch are written in the order they were submitted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Waiter(Generic[Item, Result]):
    item: Item
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    error: BaseException | None = None


class GroupCommitter(Generic[Item, Result]):
    """Runs ``write_batch(items) -> results`` (one transaction) for the items waiting together."""

    def __init__(self, write_batch: Callable[[list[Item]], list[Result]], *, max_batch: int = 64,
                 fatal: tuple[type[BaseException], ...] = ()):
        """``fatal``: errors that mean every item would fail (no point writing them one by one)."""
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._fatal = fatal
        self._lock = threading.Lock()
        self._waiting: list[_Waiter[Item, Result]] = []
        self._leading = False
        self.batches = 0  # transactions written (a batch written again item by item counts each)
        self.items = 0

    def submit(self, item: Item) -> Result:
        waiter: _Waiter[Item, Result] = _Waiter(item)
        with self._lock:
            self._waiting.append(waiter)
            lead = not self._leading
            self._leading = True
        if lead:
            self._lead()
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def _lead(self) -> None:
        """Write batches until nobody waits, then stop leading (the next caller leads)."""
        while True:
            with self._lock:
                batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
                if not batch:
                    self._leading = False
                    return
            self._write(batch)

    def _write(self, batch: list[_Waiter[Item, Result]]) -> None:
        try:
            results = self._run([waiter.item for waiter in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters, who raise it
            if len(batch) == 1 or isinstance(exc, self._fatal) or not isinstance(exc, Exception):
                for waiter in batch:
                    waiter.error = exc
                    waiter.done.set()
                return
            for waiter in batch:  # find the item that failed: the others still commit
                self._write([waiter])
            return
        for waiter, result in zip(batch, results, strict=True):
            waiter.result = result
            waiter.done.set()

    def _run(self, items: list[Item]) -> list[Result]:
        self.batches += 1
        self.items += len(items)
        return self._write_batch(items)
