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
from dataclasses import dataclass, field
from pathlib import Path

from arborl.rollout.store import blob_ids, read_only


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


def first_served_at(calls: list[tuple[float | None, float | None, bytes]], version: int) -> float | None:
    """When the first token of ``version`` (or newer) was served, from (first_token_at,
    finished_at, completion_versions) rows ordered by creation."""
    best: float | None = None
    for first_token_at, finished_at, blob in calls:
        if first_token_at is None:
            continue
        versions = blob_ids(blob)
        index = next((i for i, v in enumerate(versions) if v >= version), None)
        if index is None:
            continue
        end = finished_at if finished_at is not None else first_token_at
        at = first_token_at + (end - first_token_at) * index / max(len(versions) - 1, 1)
        best = at if best is None else min(best, at)
    return best


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
        for step, version, metrics, _ in window:
            rewarded = db.execute("SELECT MAX(completed_at) FROM groups WHERE consumed_step = ?", (step,)).fetchone()[0]
            if rewarded is None or "published_at" not in metrics:
                continue  # a feedback step, or a version never published
            calls = db.execute("SELECT first_token_at, finished_at, completion_versions FROM calls "
                               "WHERE finished_at >= ? ORDER BY created_at", (metrics["published_at"],)).fetchall()
            served = first_served_at(calls, version)
            if served is not None:
                latencies.append(served - rewarded)
    finally:
        db.close()
    return RunFigures(start, end, rollouts, len(window), busy, latencies)
