"""The metric names the shipped Prometheus rules and Grafana dashboard use (ops/monitoring/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[1] / "ops" / "monitoring"
NAME = re.compile(r"\barborl_[a-z_]+\b")


def shipped_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return exprs


def shipped_metric_names() -> set[str]:
    return {name for expr in shipped_expressions() for name in NAME.findall(expr)}
