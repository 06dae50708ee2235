"""The shipped Prometheus rules and Grafana dashboard name only metrics arborl exports.

Every ``arborl_*`` name in an alert or panel expression must be a sample name of the gateway's,
the learner's or the rollout workers' registry (tests/integration/test_up.py checks the same
names on a live `arborl up`)."""

from __future__ import annotations

import yaml

from arborl.gateway.metrics import GatewayMetrics
from arborl.learner.metrics import LearnerMetrics
from arborl.rollout.metrics import RolloutMetrics
from monitoring_names import MONITORING, shipped_metric_names


def exported_sample_names() -> set[str]:
    names: set[str] = set()
    for metrics in (GatewayMetrics(), LearnerMetrics(), RolloutMetrics()):
        names |= set(metrics.registry._names_to_collectors)  # every sample name: _total, _bucket, _sum, ...
    return names


def test_rules_and_dashboard_use_only_exported_metrics():
    shipped = shipped_metric_names()
    assert len(shipped) > 30
    assert shipped - exported_sample_names() == set()


def test_the_alerts_the_issue_asks_for_exist_and_scrape_config_covers_every_component():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == {"ArborlEngineDown", "ArborlQueueSaturated", "ArborlStalenessHigh", "ArborlRewardCollapse",
                      "ArborlEntropyCollapse", "ArborlSwapFailing"}
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert jobs == {"arborl-gateway": ["127.0.0.1:8000"], "arborl-learner": ["127.0.0.1:8001"],
                    "arborl-rollouts": ["127.0.0.1:8002"]}
    assert scrape["rule_files"] == ["alerts.yml"]


def test_rollout_series_exist_before_the_first_rollout_ends():
    """A restarted rollout worker has observed nothing yet; its /metrics still lists every series
    the shipped alerts and dashboard read, at zero."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics = RolloutMetrics()
    metrics.declare(["builtin"])
    text = generate_latest(metrics.registry).decode()
    live = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    read = shipped_metric_names() & set(metrics.registry._names_to_collectors)
    assert read and read - live == set()
    assert 'arborl_rollouts_total{outcome="solved",scaffold="builtin"} 0.0' in text
