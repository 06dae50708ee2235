"""The figures of a training run that say how well the loop runs, read from its store.

- **Rollouts per hour**: training rollouts finished (``done``) in the window, per hour.
- **Learner busy fraction**: the part of the window the learner spent on steps, from taking a
  step's groups to publishing its version (``started_at`` to ``finished_at`` of each step's
  metrics); the rest it waited for complete groups (or was paused).
- **Reward-to-served latency**, per step: from the last reward of the groups it trained on (the
  newest ``completed_at``) to the first token served by the version it produced. A token's own
  time is not stored; a call's tokens are taken as evenly spread from its first token to its end,
  so a version that arrives mid-stream is dated by its first token's index in the call.

Both ``arborl report`` and the benches (``tests/bench/bench_up.py``) read them from here.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from arborl.rollout.store import STORE_LAYOUT, ServedCall, blob_versions, open_read_model


@dataclass(frozen=True)
class RunFigures:
    start: float  # the window, as Unix times
    end: float
    rollouts: int  # training rollouts finished in the window
    steps: int  # steps committed in the window
    busy_s: float  # learner seconds spent on those steps
    latencies_s: list[float] = field(default_factory=list)  # reward-to-served, per step that was served

    @property
    def hours(self) -> float:
        return max(self.end - self.start, 1e-9) / 3600

    @property
    def rollouts_per_hour(self) -> float:
        return self.rollouts / self.hours

    @property
    def learner_busy_fraction(self) -> float:
        return min(1.0, self.busy_s / max(self.end - self.start, 1e-9))

    @property
    def latency_median_s(self) -> float | None:
        return statistics.median(self.latencies_s) if self.latencies_s else None


def first_served_by_version(
    calls: Iterable[tuple[float | None, float | None, bytes]], layout: int = STORE_LAYOUT
) -> dict[int, float]:
    """``versions_first_served`` of (first_token_at, finished_at, completion_versions blob) rows, as
    a store of ``layout`` keeps them."""
    return versions_first_served(ServedCall(first_token_at, finished_at, blob_versions(blob, layout))
                                 for first_token_at, finished_at, blob in calls)


def versions_first_served(calls: Iterable[ServedCall]) -> dict[int, float]:
    """For each version seen in ``calls``: when the first token of that version or a newer one was
    served. One pass."""
    first: dict[int, float] = {}  # the first token of exactly this version
    for call in calls:
        first_token_at, versions = call.first_token_at, call.versions
        if first_token_at is None or not versions:
            continue
        end = call.finished_at if call.finished_at is not None else first_token_at
        span = (end - first_token_at) / max(len(versions) - 1, 1)
        # Only where the version changes (a swap mid-stream); versions never decrease inside a
        # call, so equal ends mean one version throughout, as in most calls.
        starts = [0] if versions[0] == versions[-1] else [
            i for i in range(len(versions)) if i == 0 or versions[i] != versions[i - 1]]
        for index in starts:
            at = first_token_at + span * index
            first[versions[index]] = min(first.get(versions[index], at), at)
    served, earliest = {}, None
    for version in sorted(first, reverse=True):  # a newer version's token serves an older step too
        earliest = first[version] if earliest is None else min(earliest, first[version])
        served[version] = earliest
    return served


def served_at(served: dict[int, float], version: int) -> float | None:
    """When ``version`` (or newer) was first served, from ``versions_first_served``."""
    if version in served:
        return served[version]
    newer = [v for v in served if v > version]
    return served[min(newer)] if newer else None


def first_served_at(calls: list[tuple[float | None, float | None, bytes]], version: int) -> float | None:
    """When the first token of ``version`` (or newer) was served."""
    return served_at(first_served_by_version(calls), version)


def read_figures(run_dir: Path, *, start: float | None = None, end: float | None = None,
                 store_url: str = "") -> RunFigures:
    """The figures over [start, end] (default: the first rollout's start to the last event)."""
    with open_read_model(run_dir, store_url=store_url) as store:
        rollout_times = store.rollout_times()
        steps = store.train_steps()
        start = start if start is not None else (rollout_times.first_started_at or 0.0)
        end = end if end is not None else max([rollout_times.last_finished_at or start]
                                              + [s.metrics.get("finished_at", s.created_at) for s in steps])
        rollouts = store.training_rollouts_finished_between(start, end)
        window = [s for s in steps if start <= s.created_at <= end]
        busy = sum(min(s.metrics.get("finished_at", s.created_at), end) - max(s.metrics["started_at"], start)
                   for s in window if "started_at" in s.metrics)
        latencies = []
        published = [s.metrics["published_at"] for s in window if "published_at" in s.metrics]
        served = {} if not published else versions_first_served(store.served_calls(min(published)))
        rewarded = store.last_reward_by_step()
        for step in window:
            last_reward = rewarded.get(step.step)
            if last_reward is None or "published_at" not in step.metrics:
                continue  # a feedback step, or a version never published
            first = served_at(served, step.version)
            if first is not None:
                latencies.append(first - last_reward)
    return RunFigures(start, end, rollouts, len(window), busy, latencies)
