"""Group commit (rollout/store/group_commit.py): calls that wait together commit together, each
caller gets its own result, and one bad item never fails the others."""

from __future__ import annotations

import threading
import time

import pytest

from arborl.rollout.store.group_commit import GroupCommitter


class Gone(Exception):
    """Stands for the database going away: every item of the batch would fail."""


class Batches:
    """A write_batch that records its batches; the first one waits until ``release`` is set, so
    the callers that arrive meanwhile pile up behind it."""

    def __init__(self, refuse: set[int] = frozenset(), fatal: bool = False):  # type: ignore[assignment]
        self.seen: list[list[int]] = []
        self.release = threading.Event()
        self.refuse, self.fatal = refuse, fatal

    def __call__(self, items: list[int]) -> list[int]:
        if not self.seen:
            self.release.wait(10)
        self.seen.append(list(items))
        if self.fatal:
            raise Gone("the database is gone")
        if self.refuse & set(items):
            raise ValueError(f"refused {sorted(self.refuse & set(items))}")
        return [item * 10 for item in items]


def _submit_all(committer: GroupCommitter, batches: Batches, items: list[int]) -> dict[int, object]:
    """Submit ``items`` from one thread each: the first alone, the rest while it is held."""
    outcomes: dict[int, object] = {}

    def submit(item: int) -> None:
        try:
            outcomes[item] = committer.submit(item)
        except Exception as exc:  # noqa: BLE001 - checked by the test
            outcomes[item] = exc

    first = threading.Thread(target=submit, args=(items[0],))
    first.start()
    while not committer._leading:  # the first caller leads, and waits in its batch
        time.sleep(0.001)
    rest = [threading.Thread(target=submit, args=(item,)) for item in items[1:]]
    for thread in rest:
        thread.start()
    while len(committer._waiting) < len(items) - 1:
        time.sleep(0.001)
    batches.release.set()
    for thread in [first, *rest]:
        thread.join(10)
    return outcomes


def test_callers_that_wait_together_commit_in_one_batch():
    batches = Batches()
    committer = GroupCommitter(batches)
    outcomes = _submit_all(committer, batches, list(range(1, 17)))
    assert outcomes == {item: item * 10 for item in range(1, 17)}  # each caller gets its own result
    assert batches.seen[0] == [1] and sorted(batches.seen[1]) == list(range(2, 17))
    assert (committer.batches, committer.items) == (2, 16)


def test_a_batch_is_capped():
    batches = Batches()
    committer = GroupCommitter(batches, max_batch=4)
    outcomes = _submit_all(committer, batches, list(range(1, 11)))
    assert len(outcomes) == 10 and [len(b) for b in batches.seen] == [1, 4, 4, 1]


def test_one_bad_item_fails_alone():
    batches = Batches(refuse={7})
    committer = GroupCommitter(batches)
    outcomes = _submit_all(committer, batches, list(range(1, 11)))
    assert isinstance(outcomes.pop(7), ValueError)
    assert outcomes == {item: item * 10 for item in range(1, 11) if item != 7}


def test_a_database_gone_fails_the_whole_batch_at_once():
    batches = Batches(fatal=True)
    committer = GroupCommitter(batches, fatal=(Gone,))
    outcomes = _submit_all(committer, batches, list(range(1, 6)))
    assert all(isinstance(outcome, Gone) for outcome in outcomes.values()) and len(outcomes) == 5
    assert len(batches.seen) == 2  # the held one, then the rest together: never one by one


def test_a_lone_caller_commits_at_once_and_sees_its_error():
    committer = GroupCommitter(lambda items: [item + 1 for item in items])
    assert committer.submit(1) == 2 and committer.submit(5) == 6 and committer.batches == 2
    failing = GroupCommitter(lambda items: [1 // 0 for _ in items])
    with pytest.raises(ZeroDivisionError):
        failing.submit(1)
    assert not failing._leading  # the next caller leads
