"""The read model of a run: the questions watchers ask about a run's store, and typed answers.

Watchers (the live view of ``arborl up``, ``arborl report``, the run figures, the supervisor)
run in other processes than the writers (gateway, rollout workers, learner) and only ever read.
They ask these questions instead of querying the store, so they work unchanged whichever store
implementation is behind the seam (a SQLite file by default, PostgreSQL later).

Invariants every implementation keeps:

- Reading never takes a lock a writer needs, and never changes the store.
- A run without a store yet, or whose store has no ledger or controls tables yet (nothing of
  that kind happened), reads as empty: zero counts, empty lists, ``None`` where a value is
  optional. It never raises for that.
- A store that cannot answer now (busy past the timeout, a schema change under way) raises
  ``StoreReadError``; a watcher that refreshes skips that refresh, a one-off reader fails.
- Training rollouts are the rollouts of trainable groups (all groups, in stores written before
  groups could be held-out evaluations); a rollout passes with reward >= 1; a finished rollout
  without a reward reads as reward 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self


class StoreReadError(RuntimeError):
    """The store could not answer a read now (busy past the timeout, a table being changed)."""


@dataclass(frozen=True)
class TrainStep:
    """A committed training step: the version it produced and the metrics the learner recorded
    (a metrics text that is not a JSON object reads as no metrics)."""

    step: int
    version: int
    created_at: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinishedReward:
    """When a finished (``done``) training rollout finished, and its reward."""

    finished_at: float
    reward: float


@dataclass(frozen=True)
class RolloutTimes:
    """The first rollout's start, the newest rollout's start and the newest finish (all rollouts,
    evaluations included); ``None`` before any rollout."""

    first_started_at: float | None = None
    last_started_at: float | None = None
    last_finished_at: float | None = None


@dataclass(frozen=True)
class GroupCounts:
    """Trainable groups: complete and waiting for the learner, trained on, dropped."""

    waiting: int = 0
    trained: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class StepPassRate:
    """The pass rate of the finished rollouts of the groups a step trained on."""

    step: int
    pass_rate: float


@dataclass(frozen=True)
class OperatorAction:
    """One row of the audit log; ``details`` is the JSON text as it was recorded."""

    at: float
    who: str
    action: str
    details: str


@dataclass(frozen=True)
class ServedCall:
    """A call's serving times and the policy version of each of its completion tokens."""

    first_token_at: float | None
    finished_at: float | None
    versions: list[int]


class RunReadModel(ABC):
    """One run's store, read-only. Not shared between threads; ``close`` (or ``with``) when done."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for messages (a file path; never a password)."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the run has a store at all (nothing has written to a fresh run folder)."""

    # -- training steps -----------------------------------------------------------------------

    @abstractmethod
    def last_step(self) -> TrainStep | None:
        """The newest committed step; ``None`` before the first."""

    @abstractmethod
    def train_steps(self) -> list[TrainStep]:
        """Every committed step, by step number."""

    @abstractmethod
    def latest_trained_version(self) -> int:
        """The highest version a committed step produced; 0 (the starting weights) before any."""

    # -- rollouts -----------------------------------------------------------------------------

    @abstractmethod
    def training_rollouts_by_status(self) -> dict[str, int]:
        """Training rollouts per status (``running``, ``done``, ``infra_failed``); absent: none."""

    @abstractmethod
    def training_rollouts_by_scaffold(self) -> dict[str, int]:
        """Training rollouts per scaffold, the most used first."""

    @abstractmethod
    def rollout_count(self) -> int:
        """All rollouts, held-out evaluations included."""

    @abstractmethod
    def rollout_times(self) -> RolloutTimes:
        """When rollouts started and finished (all rollouts)."""

    @abstractmethod
    def training_rewards(self) -> list[FinishedReward]:
        """The finished training rollouts' rewards, oldest finish first."""

    @abstractmethod
    def recent_training_rewards(self, limit: int) -> list[float]:
        """The rewards of the ``limit`` newest finished training rollouts, newest first."""

    @abstractmethod
    def training_rollouts_finished_between(self, start: float, end: float) -> int:
        """Finished training rollouts whose finish is in [start, end]."""

    # -- groups -------------------------------------------------------------------------------

    @abstractmethod
    def training_group_counts(self) -> GroupCounts:
        """Trainable groups waiting, trained on and dropped."""

    @abstractmethod
    def dropped_groups_by_reason(self) -> dict[str, int]:
        """Dropped groups (evaluation groups included) per reason, the most frequent first."""

    @abstractmethod
    def pass_rate_by_step(self) -> list[StepPassRate]:
        """Per step that trained on groups: the pass rate of those groups' finished rollouts, by step."""

    @abstractmethod
    def last_reward_by_step(self) -> dict[int, float | None]:
        """Per step that trained on groups: when the last of those groups completed (got its last reward)."""

    # -- calls --------------------------------------------------------------------------------

    @abstractmethod
    def served_calls(self, finished_since: float) -> Iterator[ServedCall]:
        """The calls finished at or after ``finished_since``, in no particular order; read lazily,
        so a long run's calls are never all in memory (consume it before ``close``)."""

    # -- operator controls --------------------------------------------------------------------

    @abstractmethod
    def serving_pin(self) -> int | None:
        """The version serving is pinned to (rolled back to); ``None`` while not pinned."""

    @abstractmethod
    def operator_actions(self, last: int) -> list[OperatorAction] | None:
        """The ``last`` operator actions, newest first; ``None`` when the store has no audit log
        yet (no operator control was ever set up), ``[]`` when it has one but nothing happened."""

    # -- lifetime -----------------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Release the connection; closing twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
