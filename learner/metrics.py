"""Prometheus metrics of the learner (DESIGN section 9), in a registry of its own.

``arborl train`` serves them on ``--metrics-port``; a process that runs the learner beside the
gateway adds this registry to the gateway's scrape. Names start ``arborl_``, counters end
``_total``, histograms of durations ``_seconds``; a labelled counter starts every known label
value at 0, so alerts see the series before the first event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
_STEP_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# metric name -> key in the step's metrics dict (learner.train_step)
_STEP_GAUGES = {
    "arborl_learner_loss": ("loss", "Loss of the last step"),
    "arborl_learner_entropy": ("entropy", "Mean token entropy of the last step's rollouts"),
    "arborl_learner_clip_fraction": ("clip_frac", "Fraction of turns (tokens: token PPO) whose clip binds"),
    "arborl_learner_icepop_zeroed_fraction": ("icepop_zeroed_frac", "Fraction of tokens IcePop zeroed"),
    "arborl_train_rollout_mismatch": ("mismatch_abs", "Mean |logp_old - logp_rollout| of the last step"),
    "arborl_train_rollout_kl": ("mismatch_kl", "KL(rollout || train) estimate of the last step"),
    "arborl_learner_grad_norm": ("grad_norm", "Gradient norm before clipping"),
    "arborl_learner_tokens_per_second": ("tokens_per_second", "Packed tokens trained per second, last step"),
    "arborl_learner_reward_mean": ("reward_mean", "Mean reward of the last step's rollouts"),
    "arborl_learner_learning_rate": ("lr", "Learning rate of the last step"),
}


class LearnerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.step = Gauge("arborl_learner_step", "Last committed training step", registry=r)
        self.version = Gauge("arborl_learner_policy_version", "Policy version of the learner's weights", registry=r)
        self.step_duration = Histogram("arborl_learner_step_seconds", "Duration of one training step",
                                       buckets=_STEP_BUCKETS, registry=r)
        self.staleness = Histogram(
            "arborl_group_staleness_versions", "Versions between a group's oldest token and the learner",
            buckets=_STALENESS_BUCKETS, registry=r,
        )
        self.groups_trained = Counter("arborl_groups_trained_total", "Groups consumed by a step", registry=r)
        self.groups_dropped = Counter("arborl_groups_dropped_total", "Groups never trained on", ["reason"],
                                      registry=r)
        self.tokens_trained = Counter("arborl_learner_tokens_total", "Packed tokens trained on", registry=r)
        self.publish_duration = Histogram("arborl_learner_publish_seconds", "Publishing a version to serving",
                                          buckets=_STEP_BUCKETS, registry=r)
        self.publish_failures = Counter("arborl_learner_publish_failures_total", "Failed publishes", registry=r)
        self.calls_refused = Counter("arborl_learner_calls_refused_total",
                                     "Recorded calls the learner refused to train on", ["reason"], registry=r)
        self.steps_skipped = Counter(
            "arborl_learner_steps_skipped_total", "Steps whose optimizer step was skipped (nothing published)",
            ["reason"], registry=r,
        )
        self.gauges = {name: Gauge(name, text, registry=r) for name, (_, text) in _STEP_GAUGES.items()}
        # known label values start at 0
        for reason in ("stale", "uniform_reward", "no_tokens", "non_finite"):
            self.groups_dropped.labels(reason)
        self.calls_refused.labels("empty_prompt")  # learner.group_data.REFUSAL_REASONS
        self.steps_skipped.labels("non_finite")  # the loss or the gradient norm was NaN or infinite

    def observe_step(self, step: int, version: int, metrics: dict[str, float], staleness: list[int]) -> None:
        self.step.set(step)
        self.version.set(version)
        self.step_duration.observe(metrics["step_seconds"])
        self.tokens_trained.inc(metrics["tokens"])
        self.groups_trained.inc(len(staleness))
        for value in staleness:
            self.staleness.observe(value)
        for name, (key, _) in _STEP_GAUGES.items():
            if key in metrics:
                self.gauges[name].set(metrics[key])
