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

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from arborl.rollout.store import STORE_LAYOUT, blob_versions, read_only


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
    """For each version seen in (first_token_at, finished_at, completion_versions) rows of a store
    of ``layout``: when the first token of that version or a newer one was served. One pass."""
    first: dict[int, float] = {}  # the first token of exactly this version
    for first_token_at, finished_at, blob in calls:
        if first_token_at is None:
            continue
        versions = blob_versions(blob, layout)
        if not versions:
            continue
        end = finished_at if finished_at is not None else first_token_at
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
    """When ``version`` (or newer) was first served, from ``first_served_by_version``."""
    if version in served:
        return served[version]
    newer = [v for v in served if v > version]
    return served[min(newer)] if newer else None


def first_served_at(calls: list[tuple[float | None, float | None, bytes]], version: int) -> float | None:
    """When the first token of ``version`` (or newer) was served."""
    return served_at(first_served_by_version(calls), version)


def read_figures(run_dir: Path, *, start: float | None = None, end: float | None = None) -> RunFigures:
    """The figures over [start, end] (default: the first rollout's start to the last event)."""
    db = read_only(Path(run_dir) / "store.sqlite")
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        first, last = db.execute("SELECT MIN(created_at), MAX(finished_at) FROM rollouts").fetchone()
        steps = [] if "train_steps" not in tables else [
            (step, version, json.loads(metrics or "{}"), created_at) for step, version, metrics, created_at
            in db.execute("SELECT step, version, metrics, created_at FROM train_steps ORDER BY step")]
        start = start if start is not None else (first or 0.0)
        end = end if end is not None else max([last or start] + [m.get("finished_at", t) for _, _, m, t in steps])
        rollouts = db.execute(
            "SELECT COUNT(*) FROM rollouts r JOIN groups g ON g.id = r.group_id WHERE g.trainable = 1 "
            "AND r.status = 'done' AND r.finished_at BETWEEN ? AND ?", (start, end)).fetchone()[0]
        window = [(s, v, m, t) for s, v, m, t in steps if start <= t <= end]
        busy = sum(min(m.get("finished_at", t), end) - max(m["started_at"], start)
                   for _, _, m, t in window if "started_at" in m)
        latencies = []
        published = [m["published_at"] for _, _, m, _ in window if "published_at" in m]
        served = {} if not published else first_served_by_version(db.execute(
            "SELECT first_token_at, finished_at, completion_versions FROM calls WHERE finished_at >= ?",
            (min(published),)), layout=db.execute("PRAGMA user_version").fetchone()[0])
        rewarded = dict(db.execute("SELECT consumed_step, MAX(completed_at) FROM groups "
                                   "WHERE consumed_step IS NOT NULL GROUP BY consumed_step"))
        for step, version, metrics, _ in window:
            if rewarded.get(step) is None or "published_at" not in metrics:
                continue  # a feedback step, or a version never published
            first = served_at(served, version)
            if first is not None:
                latencies.append(first - rewarded[step])
    finally:
        db.close()
    return RunFigures(start, end, rollouts, len(window), busy, latencies)
