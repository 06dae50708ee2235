"""``arborl report RUN``: one self-contained page (inline CSS and SVG, no scripts, no network)
about a training run, written to ``RUN/report.html``.

Everything comes from the run folder: the store, through its read model (``RunReadModel``:
read-only, so a live run is never blocked; nothing of a kind written yet reads as empty) and the
held-out evaluations (``RUN/heldout/v{version}/results.json``, as ``eval_report`` writes them).

The page holds a table about the run (folder, steps, version, rollouts, groups trained and
dropped by reason, elapsed time), then charts over training steps, and over minutes since the
run's first rollout for what the rollouts show: reward; pass rate (train and held-out pass@1);
entropy; train-rollout mismatch; clipping and IcePop; throughput (learner and rollouts);
publish (swap) times; loss and gradient norm; and the last operator actions. Training rollouts
are the finished (``done``) rollouts of trainable groups; a rollout passes with reward >= 1.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from arborl.rollout.store import OperatorAction, RunReadModel, TrainStep, open_read_model

from .eval_report import _CSS, _esc, _pct
from .run_figures import RunFigures, read_figures
from .svg_charts import Series, format_number, line_chart

WINDOW = 20  # training rollouts in the rolling reward and pass rate
ACTIONS_SHOWN = 20
MAX_BUCKETS = 60  # rollout throughput: at most this many buckets over the run
NO_STEPS = "no training steps yet"
NO_ROLLOUTS = "no finished training rollouts yet"

_MORE_CSS = """
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; }
figcaption { font-size: 12px; color: #555; margin-bottom: 2px; }
"""


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutRate:
    version: int
    scaffold: str
    value: float
    low: float
    high: float
    tasks: int


@dataclass
class RunData:
    run_dir: Path
    steps: list[TrainStep] = field(default_factory=list)
    rewards: list[tuple[float, float]] = field(default_factory=list)  # training rollouts: (finished_at, reward)
    started_at: float | None = None  # the run's first rollout
    last_at: float | None = None  # the newest rollout, step or operator action
    rollouts: dict[str, int] = field(default_factory=dict)  # training rollouts by status
    eval_rollouts: int = 0  # rollouts of groups never trained on (held-out evaluations)
    scaffolds: dict[str, int] = field(default_factory=dict)  # training rollouts per scaffold
    groups_trained: int = 0
    groups_waiting: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> groups
    step_pass: list[tuple[float, float]] = field(default_factory=list)  # (step, pass rate of its groups)
    serving_pin: int | None = None
    actions: list[OperatorAction] | None = None  # newest first; None: no audit log yet
    heldout: list[HeldOutRate] = field(default_factory=list)
    figures: RunFigures | None = None  # rollouts per hour, learner busy fraction, reward-to-served latency


def _read_store(store: RunReadModel, data: RunData) -> None:
    times: list[float] = []
    data.steps = store.train_steps()
    times += [s.created_at for s in data.steps]
    data.rewards = [(r.finished_at, r.reward) for r in store.training_rewards()]
    data.rollouts = store.training_rollouts_by_status()
    data.scaffolds = store.training_rollouts_by_scaffold()
    data.eval_rollouts = store.rollout_count() - sum(data.rollouts.values())
    rollout_times = store.rollout_times()
    data.started_at = rollout_times.first_started_at
    times += [t for t in (rollout_times.last_started_at, rollout_times.last_finished_at) if t is not None]
    groups = store.training_group_counts()
    data.groups_trained, data.groups_waiting = groups.trained, groups.waiting
    data.dropped = store.dropped_groups_by_reason()
    data.step_pass = [(p.step, p.pass_rate) for p in store.pass_rate_by_step()]
    data.serving_pin = store.serving_pin()
    data.actions = store.operator_actions(ACTIONS_SHOWN)
    if data.actions is not None:
        times += [action.at for action in data.actions[:1]]
    data.last_at = max(times, default=None)


def read_heldout(run_dir: Path) -> list[HeldOutRate]:
    """pass@1 per held-out version and scaffold; a results file that cannot be read is skipped."""
    out = []
    for path in (run_dir / "heldout").glob("v*/results.json"):
        try:
            version = int(path.parent.name[1:])
            summary = json.loads(path.read_text(encoding="utf-8")).get("summary") or {}
            for row in summary.get("scaffolds", []):
                rate = (row.get("pass_at") or {}).get("1")
                if rate:
                    out.append(HeldOutRate(version, str(row.get("scaffold", "")), float(rate["value"]),
                                           float(rate.get("low", rate["value"])),
                                           float(rate.get("high", rate["value"])), int(rate.get("tasks", 0))))
        except (ValueError, OSError, TypeError, KeyError, AttributeError):
            continue
    return sorted(out, key=lambda r: (r.version, r.scaffold))


def read_run(run_dir: Path, *, store_url: str = "") -> RunData:
    """What the report shows, read from ``run_dir`` (its store in the database ``store_url``, if
    given); FileNotFoundError without a store."""
    data = RunData(run_dir=run_dir)
    with open_read_model(run_dir, store_url=store_url) as store:
        if not store.exists():
            raise FileNotFoundError(f"no store at {store.location}")
        _read_store(store, data)
    data.heldout = read_heldout(run_dir)
    if data.started_at is not None:
        data.figures = read_figures(run_dir, store_url=store_url)
    return data


# -- series -----------------------------------------------------------------------------------


def _minutes(data: RunData, at: float) -> float:
    return (at - (data.started_at or at)) / 60


def _rolling(data: RunData, value: Callable[[float], float]) -> list[tuple[float, float]]:
    """The mean of ``value(reward)`` over the last ``WINDOW`` training rollouts, at each finish."""
    points, window, total = [], [], 0.0
    for finished_at, reward in data.rewards:
        window.append(value(reward))
        total += window[-1]
        if len(window) > WINDOW:
            total -= window.pop(0)
        points.append((_minutes(data, finished_at), total / len(window)))
    return points


def _metric(data: RunData, key: str) -> list[tuple[float, float]]:
    """``key`` per step, for the steps that recorded a number under it."""
    return [(s.step, float(s.metrics[key])) for s in data.steps
            if isinstance(s.metrics.get(key), int | float) and not isinstance(s.metrics.get(key), bool)]


def _bucket_minutes(span: float) -> float:
    return next((w for w in (1, 2, 5, 10, 15, 30, 60, 120, 240, 480, 1440) if span / w <= MAX_BUCKETS), 2880)


def _throughput(data: RunData) -> tuple[list[tuple[float, float]], float]:
    """Training rollouts finished per minute, in buckets, at each bucket's middle; and the width."""
    finished = [_minutes(data, at) for at, _ in data.rewards]
    if not finished:
        return [], 1.0
    width = _bucket_minutes(max(finished))
    counts = Counter(int(m // width) for m in finished)
    return [((b + 0.5) * width, counts.get(b, 0) / width) for b in range(max(counts) + 1)], width


# -- HTML -------------------------------------------------------------------------------------


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours} h {rest // 60} min"
    return f"{rest // 60} min {rest % 60} s"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _header(data: RunData) -> str:
    last = data.steps[-1] if data.steps else None
    version = f"v{last.version}" if last else "v0 (the starting weights)"
    if data.serving_pin is not None:
        version += f"; serving pinned to v{data.serving_pin} (rolled back)"
    dropped = sum(data.dropped.values())
    rows = {
        "run folder": str(data.run_dir.resolve()),
        "steps": f"{len(data.steps)} (last step {last.step})" if last else NO_STEPS,
        "current version": version,
        "training rollouts": (f"{data.rollouts.get('done', 0)} done, {data.rollouts.get('infra_failed', 0)} "
                              f"infra_failed, {data.rollouts.get('running', 0)} running"),
        "scaffolds (training rollouts)": _counts(data.scaffolds) or "-",
        "evaluation rollouts": f"{data.eval_rollouts} (held-out, never trained on)",
        "groups": (f"{data.groups_trained} trained, {dropped} dropped"
                   + (f" ({_counts(data.dropped)})" if dropped else "") + f", {data.groups_waiting} waiting"),
        "elapsed": (f"{_duration(data.last_at - data.started_at)} (first rollout {_when(data.started_at)})"
                    if data.started_at is not None and data.last_at is not None else "-"),
        **_loop_figures(data.figures),
        "report written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows.items())
    return f'<table class="meta">{body}</table>'


def _loop_figures(figures: RunFigures | None) -> dict[str, str]:
    if figures is None:
        return {}
    latency = figures.latency_median_s
    return {
        "rollouts per hour": f"{figures.rollouts_per_hour:.0f}",
        "learner busy": f"{100 * figures.learner_busy_fraction:.0f}% of the time since the first rollout",
        "reward to served (median)": ("-" if latency is None else
                                      f"{_duration(latency)} over {len(figures.latencies_s)} steps"),
    }


def _figure(caption: str, chart: str) -> str:
    return f"<figure><figcaption>{_esc(caption)}</figcaption>{chart}</figure>"


def _step_chart(data: RunData, caption: str, keys: list[tuple[str, str]], **kw: Any) -> str:
    """A chart of metrics per step: ``keys`` is (metric key, legend label) pairs."""
    empty = NO_STEPS if not data.steps else f"no {', '.join(k for k, _ in keys)} recorded"
    series = [Series(label, _metric(data, key)) for key, label in keys]
    return _figure(caption, line_chart(series, x_label="step", integer_x=True, empty=empty, **kw))


def _minutes_chart(caption: str, series: list[Series], **kw: Any) -> str:
    return _figure(caption, line_chart(series, x_label="minutes since the first rollout", empty=NO_ROLLOUTS, **kw))


def _heldout_table(data: RunData) -> str:
    if not data.heldout:
        return '<p class="none">no held-out evaluations yet</p>'
    rows = "".join(
        f'<tr><td class="num">v{r.version}</td><td>{_esc(r.scaffold)}</td><td class="num">{_pct(r.value)} '
        f'<span class="ci">[{_pct(r.low)}, {_pct(r.high)}] · {r.tasks} tasks</span></td></tr>'
        for r in data.heldout)
    return f"<table><tr><th>version</th><th>scaffold</th><th>held-out pass@1</th></tr>{rows}</table>"


def _actions_table(data: RunData) -> str:
    if data.actions is None:
        return '<p class="none">no operator actions recorded (no audit log in this store)</p>'
    if not data.actions:
        return '<p class="none">no operator actions yet</p>'
    rows = "".join(f"<tr><td>{_esc(_when(a.at))}</td><td>{_esc(a.who)}</td><td>{_esc(a.action)}</td>"
                   f'<td class="small"><code>{_esc(a.details)}</code></td></tr>'
                   for a in data.actions)
    return f"<table><tr><th>when</th><th>who</th><th>action</th><th>details</th></tr>{rows}</table>"


def _sections(data: RunData) -> list[tuple[str, list[str]]]:
    by_scaffold: dict[str, list[tuple[float, float]]] = {}
    for r in data.heldout:
        by_scaffold.setdefault(r.scaffold, []).append((r.version, r.value))
    heldout = [Series(f"held-out pass@1 {name}", pts) for name, pts in by_scaffold.items()]
    trained = Series("train: groups trained at the step", data.step_pass)
    per_minute, bucket = _throughput(data)
    publish = (_step_chart(data, "seconds to publish each version into serving", [("publish_seconds", "publish")],
                           y_label="seconds", y_floor=0.0)
               if _metric(data, "publish_seconds") else '<p class="none">no publish times recorded</p>')
    return [
        ("Reward", [
            _minutes_chart(f"mean reward of the last {WINDOW} training rollouts",
                           [Series("rolling reward", _rolling(data, float))], y_label="reward"),
            _step_chart(data, "reward_mean of each step's groups", [("reward_mean", "reward_mean")],
                        y_label="reward"),
        ]),
        ("Pass rate", [
            _minutes_chart(f"train pass rate (reward >= 1) of the last {WINDOW} training rollouts",
                           [Series("train pass rate", _rolling(data, lambda r: float(r >= 1)))], percent=True),
            _figure("pass rate per step: the groups trained at the step, and held-out pass@1 per version",
                    line_chart([trained, *heldout], x_label="step / policy version", percent=True,
                               integer_x=True, empty=NO_STEPS if not data.steps else "no pass rates yet")),
            _heldout_table(data),
        ]),
        ("Entropy", [_step_chart(data, "mean token entropy per step", [("entropy", "entropy")])]),
        ("Train-rollout mismatch", [
            _step_chart(data, "mean |p_rollout - p_train| per token", [("mismatch_abs", "mismatch_abs")]),
            _step_chart(data, "KL(rollout || train), k3 estimate", [("mismatch_kl", "mismatch_kl")]),
        ]),
        ("Clipping and IcePop", [
            _step_chart(data, "fraction of tokens clipped, and zeroed by IcePop",
                        [("clip_frac", "clip_frac"), ("icepop_zeroed_frac", "icepop_zeroed_frac")],
                        y_floor=0.0),
        ]),
        ("Throughput", [
            _step_chart(data, "learner tokens per second", [("tokens_per_second", "tokens/s")], y_floor=0.0),
            _minutes_chart(f"training rollouts finished per minute (buckets of {format_number(bucket)} min)",
                           [Series("rollouts / min", per_minute)], y_floor=0.0),
        ]),
        ("Publish (swap) times", [publish]),
        ("Loss and gradient norm", [
            _step_chart(data, "loss per step", [("loss", "loss")]),
            _step_chart(data, "gradient norm (before clipping)", [("grad_norm", "grad_norm")], y_floor=0.0),
        ]),
        (f"Operator actions (last {ACTIONS_SHOWN}, newest first)", [_actions_table(data)]),
    ]


def render_run_report(data: RunData) -> str:
    title = f"arborl run {data.run_dir.resolve().name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}{_MORE_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        _header(data),
    ]
    if not data.steps:
        parts.append(f'<p class="none">{NO_STEPS}</p>')
    for heading, blocks in _sections(data):
        parts.append(f"<h2>{_esc(heading)}</h2>")
        charts = [b for b in blocks if b.startswith("<figure")]
        parts.append(f'<div class="charts">{"".join(charts)}</div>' if charts else "")
        parts += [b for b in blocks if not b.startswith("<figure")]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def write_run_report(run_dir: Path, *, store_url: str = "") -> Path:
    """Read ``run_dir`` (and its store at ``store_url``) and write its report to
    ``run_dir/report.html``; returns that path."""
    run_dir = Path(run_dir)
    page = render_run_report(read_run(run_dir, store_url=store_url))
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out

