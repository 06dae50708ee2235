"""Prometheus metrics of the rollout orchestrator (DESIGN section 9), in a registry of its own.

``arborl rollout --metrics-port`` serves them; ``arborl up`` scrapes every component's registry.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .results import RolloutResult

_SECONDS_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
_REWARD_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
_TURN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PHASES = ("setup", "agent", "model", "tools", "verify", "teardown")
OUTCOMES = ("solved", "failed", "infra_failed", "verifier_failed")


class RolloutMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rollouts = Counter("arborl_rollouts_total", "Finished rollouts by scaffold and outcome "
                                "(solved, failed: graded below 1, infra_failed: not graded, "
                                "verifier_failed: the task's verifier gave no reward)",
                                ["scaffold", "outcome"], registry=r)
        self.infra_attempts = Counter("arborl_rollout_infra_failures_total",
                                      "Attempts lost to an infrastructure or verifier failure (each is retried)",
                                      ["scaffold"], registry=r)
        self.running = Gauge("arborl_rollouts_running", "Rollouts under way", registry=r)
        self.reward = Histogram("arborl_rollout_reward", "Reward of graded rollouts", ["scaffold"],
                                buckets=_REWARD_BUCKETS, registry=r)
        self.turns = Histogram("arborl_rollout_turns", "Model calls per graded rollout", ["scaffold"],
                               buckets=_TURN_BUCKETS, registry=r)
        self.seconds = Histogram("arborl_rollout_seconds", "Seconds per graded rollout, by phase", ["phase"],
                                 buckets=_SECONDS_BUCKETS, registry=r)
        self.groups_completed = Counter("arborl_groups_completed_total", "Groups whose every rollout is graded",
                                        registry=r)

    def declare(self, scaffolds: Iterable[str]) -> None:
        """Create every labelled series of these scaffolds at zero, so that /metrics lists them
        before the first rollout ends (after a restart too): a dashboard's rate() and an alert
        then read 0 instead of a missing series."""
        for scaffold in scaffolds:
            for outcome in OUTCOMES:
                self.rollouts.labels(scaffold, outcome)
            self.infra_attempts.labels(scaffold)
            self.reward.labels(scaffold)
            self.turns.labels(scaffold)
        for phase in (*PHASES, "total"):
            self.seconds.labels(phase)

    def observe(self, result: RolloutResult) -> None:
        if result.status != "done":
            self.rollouts.labels(result.scaffold, result.status).inc()
            return
        self.rollouts.labels(result.scaffold, "solved" if result.solved else "failed").inc()
        self.reward.labels(result.scaffold).observe(result.reward or 0.0)
        self.turns.labels(result.scaffold).observe(result.turns)
        timings = result.timings
        for phase in PHASES:
            self.seconds.labels(phase).observe(getattr(timings, f"{phase}_s"))
        self.seconds.labels("total").observe(timings.total_s)
