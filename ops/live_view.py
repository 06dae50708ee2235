"""The live terminal view of ``arborl up``: what the run is doing, refreshed every second.

A ``RunSnapshot`` is read from the run's ledger (steps, rollouts, groups waiting), the gateway's
``/metrics`` (served version, tokens generated, swap time) and the held-out results on disk; the
view draws it as a table (rich) on a terminal, and as one line every ``LINE_EVERY_S`` seconds
otherwise (a log file, CI).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

if TYPE_CHECKING:
    from .up import Supervisor

RECENT = 50  # rollouts in the rolling reward and pass rate
LINE_EVERY_S = 30.0


@dataclass
class RunSnapshot:
    step: int = 0
    version: int = 0  # the learner's last committed version
    served_version: int | None = None  # what the gateway serves (None: unreachable)
    step_metrics: dict[str, Any] = field(default_factory=dict)
    rollouts_done: int = 0
    rollouts_failed: int = 0  # infrastructure failures
    rollouts_running: int = 0
    recent_reward: float | None = None
    recent_pass_rate: float | None = None
    groups_waiting: int = 0  # complete, not yet trained on
    groups_trained: int = 0
    groups_dropped: int = 0
    generated_tokens: float = 0.0
    swap_mean_s: float | None = None
    heldout: dict[int, float] = field(default_factory=dict)  # version -> pass@1
    children: dict[str, str] = field(default_factory=dict)  # name -> "running" / "restarting (n)"


def read_ledger(run_dir: Path, snapshot: RunSnapshot, *, store_url: str = "") -> None:
    from arborl.rollout.store import StoreReadError, open_read_model

    with open_read_model(run_dir, store_url=store_url, timeout_s=5) as store:
        try:
            last = store.last_step()
            if last:
                snapshot.step, snapshot.version = last.step, last.version
                snapshot.step_metrics = last.metrics
            counts = store.training_rollouts_by_status()
            snapshot.rollouts_done = counts.get("done", 0)
            snapshot.rollouts_failed = counts.get("infra_failed", 0)
            snapshot.rollouts_running = counts.get("running", 0)
            rewards = store.recent_training_rewards(RECENT)
            if rewards:
                snapshot.recent_reward = sum(rewards) / len(rewards)
                snapshot.recent_pass_rate = sum(value >= 1.0 for value in rewards) / len(rewards)
            groups = store.training_group_counts()
            snapshot.groups_waiting, snapshot.groups_trained = groups.waiting, groups.trained
            snapshot.groups_dropped = groups.dropped
        except StoreReadError:
            pass  # the store is busy or a table is being changed: the next refresh reads it


def read_gateway(url: str, snapshot: RunSnapshot) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    snapshot.served_version = int(values.get("arborl_policy_version", 0))
    snapshot.generated_tokens = values.get("arborl_completion_tokens_total", 0.0)
    swaps = values.get("arborl_weight_swap_seconds_count", 0.0)
    if swaps:
        snapshot.swap_mean_s = values.get("arborl_weight_swap_seconds_sum", 0.0) / swaps


def read_heldout(run_dir: Path, snapshot: RunSnapshot) -> None:
    from .run_report import read_heldout as heldout_rates

    for rate in heldout_rates(run_dir):  # by version, then scaffold: the first scaffold's pass@1
        snapshot.heldout.setdefault(rate.version, rate.value)


def take_snapshot(supervisor: Supervisor) -> RunSnapshot:
    snapshot = RunSnapshot()
    read_ledger(supervisor.run_dir, snapshot, store_url=supervisor.config.store.url)
    read_gateway(supervisor.url, snapshot)
    read_heldout(supervisor.run_dir, snapshot)
    for name, child in supervisor.children.items():
        snapshot.children[name] = "running" if child.running else "down"
        if child.restarts:
            snapshot.children[name] += f" ({child.restarts} restarts)"
    return snapshot


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


class LiveView:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.tty = sys.stdout.isatty()
        self._live: Any = None
        self._last_line = 0.0
        self._last_tokens: tuple[float, float] | None = None  # (time, tokens) for the rate
        self.tokens_per_s: float | None = None

    def __enter__(self) -> Self:
        if self.tty:
            from rich.live import Live

            self._live = Live(self._render(RunSnapshot()), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def refresh(self) -> RunSnapshot:
        snapshot = take_snapshot(self.supervisor)
        now = time.monotonic()
        if self._last_tokens is not None and now > self._last_tokens[0]:
            self.tokens_per_s = (snapshot.generated_tokens - self._last_tokens[1]) / (now - self._last_tokens[0])
        self._last_tokens = (now, snapshot.generated_tokens)
        if self._live is not None:
            self._live.update(self._render(snapshot))
        elif now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            print(self.line(snapshot), flush=True)
        return snapshot

    def line(self, s: RunSnapshot) -> str:
        heldout = ", ".join(f"v{v} {rate:.0%}" for v, rate in sorted(s.heldout.items())) or "-"
        return (f"step {s.step} v{s.version} (serving v{s.served_version if s.served_version is not None else '?'}) "
                f"| rollouts {s.rollouts_done} done, {s.rollouts_running} running, {s.rollouts_failed} infra "
                f"| reward {_fmt(s.recent_reward)} pass {_fmt(s.recent_pass_rate, '.0%')} "
                f"| groups {s.groups_waiting} waiting, {s.groups_trained} trained, {s.groups_dropped} dropped "
                f"| {_fmt(self.tokens_per_s, '.1f')} tok/s | held-out {heldout}")

    def _render(self, s: RunSnapshot) -> Any:
        from rich.table import Table

        table = Table(title=f"arborl up  {self.supervisor.run_dir}", show_header=False, expand=False)
        table.add_column(style="bold")
        table.add_column()
        metrics = s.step_metrics
        table.add_row("step / version", f"{s.step} / v{s.version}   serving v{s.served_version}")
        table.add_row("rollouts", f"{s.rollouts_done} done, {s.rollouts_running} running, "
                                  f"{s.rollouts_failed} infrastructure failures")
        table.add_row(f"last {RECENT} rollouts", f"reward {_fmt(s.recent_reward)}   pass rate "
                                                 f"{_fmt(s.recent_pass_rate, '.1%')}")
        table.add_row("groups", f"{s.groups_waiting} waiting (queue), {s.groups_trained} trained, "
                                f"{s.groups_dropped} dropped")
        table.add_row("last step", f"loss {_fmt(metrics.get('loss'))}  entropy {_fmt(metrics.get('entropy'))}  "
                                   f"reward {_fmt(metrics.get('reward_mean'))}  "
                                   f"{_fmt(metrics.get('tokens_per_second'), '.0f')} train tok/s  staleness max "
                                   f"{metrics.get('staleness_max', '-')}")
        table.add_row("serving", f"{_fmt(self.tokens_per_s, '.1f')} generated tok/s   last swaps "
                                 f"{_fmt(s.swap_mean_s, '.2f')} s on average")
        heldout = "   ".join(f"v{v}: {rate:.1%}" for v, rate in sorted(s.heldout.items())) or "not yet"
        table.add_row("held-out pass@1", heldout)
        table.add_row("processes", "   ".join(f"{name} {state}" for name, state in s.children.items()))
        for event in self.supervisor.events[-3:]:
            table.add_row("", event)
        return table
