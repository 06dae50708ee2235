"""Pass rates for `arborl eval`: a dataset run under one or more scaffolds, summarised and drawn.

An evaluation samples every task several times per scaffold. The headline number is pass@k,
estimated without bias from n samples of which c solved the task (Chen et al. 2021), averaged
over tasks, with a 95% interval from a percentile bootstrap over tasks: tasks, not rollouts,
are the unit that varies between datasets, so they are what gets resampled.

The report is two files in the run's output folder:

* ``results.json``: the run's meta, the summary below and every ``RolloutResult``, enough to
  redo the statistics later (``load_results`` reads the results back);
* ``report.html``: one self-contained page (inline CSS and SVG, no scripts, no network) with,
  from the top: the run's meta (dataset, model, policy version, k, date); a table of scaffolds
  (pass@1 and pass@k with their intervals, mean reward, tokens and seconds per rollout,
  infrastructure failures, how the rollouts ended); a bar chart of pass@1 and pass@k per
  scaffold with the intervals as whiskers; a stacked bar of where a rollout's time goes (model,
  the agent's tools, the verifier, everything else); and a table with a row per task and a
  column per scaffold showing c/n, where every rollout links to its trie page and its log and
  says, in the table itself, why it did not solve the task (how it ended, after how many turns,
  how many calls were cut off, the verifier's or the failure's reason, earlier failed attempts).

Every planned task has its row, also when an interrupted run left it unfinished: a cell counts
the rollouts that did not run, and the attempts that failed on the way (``Planned``).

Only finished rollouts (``status == "done"``) are samples. A rollout that failed for
infrastructure reasons even after its retries, or whose task's verifier gave no reward (a
verifier failure: a broken task), says nothing about the policy, so it is counted apart, each
kind in its own column, and never enters a pass rate; a task left with fewer than k samples
still counts towards pass@j for every j up to its sample count.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from arborl.rollout.results import RolloutResult

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

TrieHref = Callable[[str], str | None]
LogHref = Callable[[RolloutResult], str | None]


# -- the estimator ----------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n solves the task,
    given that c of the n did (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    The product form (as in the paper's reference code) never forms the binomials, which leave a
    float's range once n reaches the low thousands, and it is exact in the cases that matter: 0
    when c = 0 (an empty product), 1 when every k-subset must hold a solved sample (n - c < k).
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k} with n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _bootstrap_interval(values: Sequence[float], *, seed: int, resamples: int) -> tuple[float, float]:
    """Percentile bootstrap over tasks of the mean of ``values``, at ``CONFIDENCE``.

    Seeded so that a report regenerated from the same results shows the same intervals. With a
    single task there is nothing to resample, so the interval collapses onto the estimate. The
    bounds are widened to include the estimate itself: with very few tasks the resampled means
    are coarse, and a table should never show a value outside its own whiskers.
    """
    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, mean
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return min(float(low), mean), max(float(high), mean)


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassRate:
    """pass@k for one scaffold: the mean over tasks of ``pass_at_k``, and its bootstrap interval.
    ``tasks`` is how many tasks had at least k finished samples, the only ones counted."""

    k: int
    value: float
    low: float
    high: float
    tasks: int


@dataclass(frozen=True)
class Planned:
    """What a run planned for one task under one scaffold: ``rollouts`` of them, and the errors
    of attempts that led to no result (an interrupted rollout, a retry cut short)."""

    task_id: str
    scaffold: str
    rollouts: int
    failed_attempts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimeSplit:
    """Mean seconds per rollout in each phase; the four add up to the mean total."""

    model_s: float = 0.0
    tools_s: float = 0.0
    verify_s: float = 0.0
    overhead_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.model_s + self.tools_s + self.verify_s + self.overhead_s


@dataclass(frozen=True)
class ScaffoldSummary:
    """One scaffold over the whole dataset. Means are over finished rollouts (0 when there are
    none, which the report shows as "-"); ``tasks`` counts every task with any result, finished
    or not; ``pass_at`` holds k = 1..K for each k at least one task has enough samples for."""

    scaffold: str
    tasks: int
    rollouts: int
    infra_failed: int
    verifier_failed: int
    pass_at: dict[int, PassRate]
    mean_reward: float
    mean_prompt_tokens: float
    mean_completion_tokens: float
    mean_seconds: float
    timings: TimeSplit
    resolutions: dict[str, int]  # FULL / PARTIAL / NO, for tests-graded tasks
    ended_by: dict[str, int]


@dataclass(frozen=True)
class TaskCell:
    """One task under one scaffold: n finished samples of which c solved it, and their costs."""

    task_id: str
    scaffold: str
    n: int
    c: int
    infra_failed: int
    verifier_failed: int
    rewards: list[float]
    mean_tokens: float  # prompt + completion per finished rollout
    mean_seconds: float
    session_ids: list[str]  # finished rollouts, in the order the results came
    unfinished: int = 0  # planned rollouts with no result (an interrupted run)
    failed_attempts: tuple[str, ...] = ()  # errors of attempts that led to no result


@dataclass(frozen=True)
class EvalSummary:
    """Everything the report shows, computed once by ``summarize``."""

    k: int
    scaffolds: tuple[ScaffoldSummary, ...]
    task_ids: tuple[str, ...]
    cells: tuple[TaskCell, ...]  # sorted by task id, then scaffold
    results: int  # every record, finished or not
    rollouts: int  # finished
    infra_failed: int
    verifier_failed: int
    solved: int
    unfinished: int = 0  # planned rollouts with no result

    def cell(self, task_id: str, scaffold: str) -> TaskCell | None:
        return next((c for c in self.cells if c.task_id == task_id and c.scaffold == scaffold), None)

    def scaffold(self, name: str) -> ScaffoldSummary | None:
        return next((s for s in self.scaffolds if s.scaffold == name), None)


# -- summarising --------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float:
    """Mean that is 0 for no values: a scaffold with no finished rollouts has no costs to show."""
    data = list(values)
    return sum(data) / len(data) if data else 0.0


def _reward(result: RolloutResult) -> float:
    """A finished rollout without a reward was not passed by the verifier, so it counts as 0."""
    return result.reward if result.reward is not None else 0.0


def _count_status(results: Iterable[RolloutResult], status: str) -> int:
    return sum(r.status == status for r in results)


def _task_cell(task_id: str, scaffold: str, results: Sequence[RolloutResult], planned: Planned | None) -> TaskCell:
    done = [r for r in results if r.status == "done"]
    return TaskCell(
        unfinished=max(0, planned.rollouts - len(results)) if planned else 0,
        failed_attempts=planned.failed_attempts if planned else (),
        task_id=task_id,
        scaffold=scaffold,
        n=len(done),
        c=sum(r.solved for r in done),
        infra_failed=_count_status(results, "infra_failed"),
        verifier_failed=_count_status(results, "verifier_failed"),
        rewards=[_reward(r) for r in done],
        mean_tokens=_mean(r.prompt_tokens + r.completion_tokens for r in done),
        mean_seconds=_mean(r.timings.total_s for r in done),
        session_ids=[r.session_id for r in done],
    )


def _pass_rate(cells: Sequence[TaskCell], k: int, *, seed: int, resamples: int) -> PassRate | None:
    """pass@k over the tasks with at least k samples; None when no task has that many."""
    values = [pass_at_k(cell.n, cell.c, k) for cell in cells if cell.n >= k]
    if not values:
        return None
    low, high = _bootstrap_interval(values, seed=seed, resamples=resamples)
    return PassRate(k=k, value=sum(values) / len(values), low=low, high=high, tasks=len(values))


def _time_split(done: Sequence[RolloutResult]) -> TimeSplit:
    return TimeSplit(
        model_s=_mean(r.timings.model_s for r in done),
        tools_s=_mean(r.timings.tools_s for r in done),
        verify_s=_mean(r.timings.verify_s for r in done),
        overhead_s=_mean(r.timings.overhead_s for r in done),
    )


def _scaffold_summary(
    scaffold: str,
    results: Sequence[RolloutResult],
    cells: Sequence[TaskCell],
    k: int,
    *,
    seed: int,
    resamples: int,
) -> ScaffoldSummary:
    done = [r for r in results if r.status == "done"]
    rates = (_pass_rate(cells, j, seed=seed, resamples=resamples) for j in range(1, k + 1))
    return ScaffoldSummary(
        scaffold=scaffold,
        tasks=len(cells),
        rollouts=len(done),
        infra_failed=_count_status(results, "infra_failed"),
        verifier_failed=_count_status(results, "verifier_failed"),
        pass_at={rate.k: rate for rate in rates if rate is not None},
        mean_reward=_mean(_reward(r) for r in done),
        mean_prompt_tokens=_mean(r.prompt_tokens for r in done),
        mean_completion_tokens=_mean(r.completion_tokens for r in done),
        mean_seconds=_mean(r.timings.total_s for r in done),
        timings=_time_split(done),
        resolutions=dict(sorted(Counter(r.resolution for r in done if r.resolution).items())),
        ended_by=dict(sorted(Counter(r.ended_by for r in done if r.ended_by).items())),
    )


def summarize(
    results: Iterable[RolloutResult], k: int, *, planned: Iterable[Planned] = (), seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES
) -> EvalSummary:
    """Pass rates and costs per scaffold and per task. Scaffolds and tasks come out sorted by
    name, so the same results always give the same summary (intervals included, for a seed).
    ``planned`` adds the tasks and scaffolds a run planned but left without results, and counts
    what each cell still lacks."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    records = list(results)
    plan = {(p.scaffold, p.task_id): p for p in planned}
    groups: dict[tuple[str, str], list[RolloutResult]] = {key: [] for key in plan}
    for r in records:
        groups.setdefault((r.scaffold, r.task_id), []).append(r)
    cells = {key: _task_cell(key[1], key[0], rs, plan.get(key)) for key, rs in groups.items()}

    scaffolds = sorted({scaffold for scaffold, _ in groups})
    summaries = tuple(
        _scaffold_summary(
            name,
            [r for r in records if r.scaffold == name],
            [cells[key] for key in sorted(cells) if key[0] == name],
            k,
            seed=seed,
            resamples=resamples,
        )
        for name in scaffolds
    )
    done = [r for r in records if r.status == "done"]
    return EvalSummary(
        k=k,
        scaffolds=summaries,
        task_ids=tuple(sorted({task_id for _, task_id in groups})),
        cells=tuple(sorted(cells.values(), key=lambda c: (c.task_id, c.scaffold))),
        results=len(records),
        rollouts=len(done),
        infra_failed=_count_status(records, "infra_failed"),
        verifier_failed=_count_status(records, "verifier_failed"),
        solved=sum(r.solved for r in done),
        unfinished=sum(cell.unfinished for cell in cells.values()),
    )


# -- JSON ---------------------------------------------------------------------------------------


def summary_to_json(summary: EvalSummary) -> dict[str, Any]:
    """The summary as plain JSON data; pass@k keys become strings, as JSON object keys must."""
    data = asdict(summary)
    for scaffold, original in zip(data["scaffolds"], summary.scaffolds, strict=True):
        scaffold["timings"]["total_s"] = original.timings.total_s
    return data


def load_results(path: Path | str) -> list[RolloutResult]:
    """The rollouts a ``results.json`` holds, to recompute or re-render a report later."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [RolloutResult.from_json(item) for item in data["results"]]


def _write_json(
    path: Path, summary: EvalSummary, results: Sequence[RolloutResult], meta: dict[str, Any]
) -> None:
    data = {
        "meta": meta,
        "summary": summary_to_json(summary),
        "results": [r.to_json() for r in results],
    }
    # default=str: meta may carry dates or paths, which are shown, not computed with.
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")


# -- HTML: formatting ---------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { margin-top: 1.6em; font-size: 1.15em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ci { color: #666; font-size: 12px; }
.small { color: #555; font-size: 12px; }
table.tasks td.cell { min-width: 7em; }
.cn { display: inline-block; min-width: 2.6em; font-weight: 600; }
.r { margin: 1px 0; font-size: 12px; }
.why { color: #444; font-size: 11px; }
.r a { text-decoration: none; }
.r.ok a.trie { color: #1a7f37; }
.r.fail a.trie { color: #b42318; }
.r.infra a.trie, .r.infra { color: #888; }
.r.verifier a.trie, .r.verifier { color: #9a6700; }
.r a.log { color: #777; font-size: 10px; vertical-align: super; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
.none { color: #888; font-style: italic; }
"""

_PASS_COLORS = ("#4c78a8", "#f58518")  # pass@1, pass@k
_TIME_PARTS = (
    ("model", "model_s", "#4c78a8"),
    ("tools", "tools_s", "#54a24b"),
    ("verify", "verify_s", "#e45756"),
    ("overhead", "overhead_s", "#bab0ac"),
)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _rate_html(rate: PassRate | None) -> str:
    if rate is None:
        return "-"
    ci = f"[{_pct(rate.low)}, {_pct(rate.high)}]"
    return f'{_pct(rate.value)} <span class="ci">{ci} · {rate.tasks} tasks</span>'


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def _cell_colour(cell: TaskCell) -> str:
    """Red for none solved through green for all, so a column reads at a glance."""
    if cell.n == 0:
        return "#eeeeee"
    return f"hsl({120 * cell.c / cell.n:.0f}, 65%, 85%)"


# -- HTML: sections -----------------------------------------------------------------------------


def _complete_meta(summary: EvalSummary, meta: dict[str, Any]) -> dict[str, Any]:
    """The caller's meta plus k and the date when it left them out: a report must say both."""
    full = dict(meta)
    full.setdefault("k", summary.k)
    full.setdefault("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    return full


def _meta_section(summary: EvalSummary, meta: dict[str, Any]) -> str:
    rows = dict(meta)
    rows["rollouts"] = (
        f"{summary.rollouts} finished ({summary.solved} solved), {summary.infra_failed} infra failures, "
        f"{summary.verifier_failed} verifier failures, {summary.unfinished} not run, "
        f"{len(summary.task_ids)} tasks, {len(summary.scaffolds)} scaffolds"
    )
    body = "".join(f"<tr><th>{_esc(key)}</th><td>{_esc(value)}</td></tr>" for key, value in rows.items())
    return f'<table class="meta">{body}</table>'


def _scaffold_table(summary: EvalSummary) -> str:
    k = summary.k
    head = ["scaffold", "tasks", "rollouts", "pass@1"] + ([f"pass@{k}"] if k > 1 else [])
    head += [
        "mean reward",
        "prompt tok",
        "completion tok",
        "s / rollout",
        "infra failed",
        "verifier failed",
        "ended by",
        "resolution",
    ]
    rows = []
    for s in summary.scaffolds:
        finished = s.rollouts > 0
        cells = [
            f"<td>{_esc(s.scaffold)}</td>",
            f'<td class="num">{s.tasks}</td>',
            f'<td class="num">{s.rollouts}</td>',
            f"<td>{_rate_html(s.pass_at.get(1))}</td>",
        ]
        if k > 1:
            cells.append(f"<td>{_rate_html(s.pass_at.get(k))}</td>")
        for value, fmt in (
            (s.mean_reward, ".3f"),
            (s.mean_prompt_tokens, ".0f"),
            (s.mean_completion_tokens, ".0f"),
            (s.mean_seconds, ".1f"),
        ):
            cells.append(f'<td class="num">{format(value, fmt) if finished else "-"}</td>')
        cells += [
            f'<td class="num">{s.infra_failed}</td>',
            f'<td class="num">{s.verifier_failed}</td>',
            f'<td class="small">{_esc(_counts_text(s.ended_by))}</td>',
            f'<td class="small">{_esc(_counts_text(s.resolutions))}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return f'<table class="scaffolds"><tr>{header}</tr>{"".join(rows)}</table>'


def _label(x: float, y: float, text: str, *, anchor: str, room: int) -> str:
    """SVG text cut to ``room`` characters, so a long scaffold name cannot run over its
    neighbours; the full name stays in the tooltip."""
    shown = text if len(text) <= room else text[: room - 1] + "…"
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"><title>{_esc(text)}</title>'
        f"{_esc(shown)}</text>"
    )


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    out, at = [], x
    for label, colour in items:
        out.append(
            f'<rect x="{at:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{at + 14:.1f}" y="{y:.1f}">{_esc(label)}</text>'
        )
        at += 24 + 7 * len(label)
    return "".join(out)


def _whiskered_bar(
    x: float, width: float, rate: PassRate, colour: str, y_of: Callable[[float], float], tip: str
) -> str:
    """One pass-rate bar from the axis up to its value, with the interval as a whisker on top."""
    mid, base = x + width / 2, y_of(0.0)
    top = y_of(rate.value)
    caps = "".join(
        f'<line x1="{mid - 5:.1f}" x2="{mid + 5:.1f}" y1="{y_of(v):.1f}" y2="{y_of(v):.1f}" stroke="#222"/>'
        for v in (rate.low, rate.high)
    )
    return (
        f'<rect x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" height="{base - top:.1f}" fill="{colour}">'
        f"<title>{_esc(tip)}</title></rect>"
        f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="{y_of(rate.low):.1f}" y2="{y_of(rate.high):.1f}" '
        f'stroke="#222"/>{caps}'
    )


def _pass_chart(summary: EvalSummary) -> str:
    """Vertical bars of pass@1 and pass@k per scaffold on a 0..100% axis, intervals as whiskers."""
    ks = [1, summary.k] if summary.k > 1 else [1]
    left, top, plot_h, bar_w, gap = 44, 24, 180, 26, 8
    group_w = 40 + (bar_w + gap) * len(ks)
    width = left + group_w * len(summary.scaffolds) + 20
    height = top + plot_h + 40

    def y_of(v: float) -> float:
        return top + (1 - v) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for tick in (0, 0.25, 0.5, 0.75, 1):
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{100 * tick:.0f}%</text>'
        )
    for i, s in enumerate(summary.scaffolds):
        x0 = left + i * group_w + 20
        for j, k in enumerate(ks):
            rate = s.pass_at.get(k)
            if rate is not None:
                tip = f"{s.scaffold} pass@{k} {_pct(rate.value)} [{_pct(rate.low)}, {_pct(rate.high)}]"
                parts.append(_whiskered_bar(x0 + j * (bar_w + gap), bar_w, rate, _PASS_COLORS[j], y_of, tip))
        centre = x0 + (len(ks) * (bar_w + gap) - gap) / 2
        parts.append(_label(centre, top + plot_h + 16, s.scaffold, anchor="middle", room=16))
    labels = [(f"pass@{k}", _PASS_COLORS[j]) for j, k in enumerate(ks)]
    parts.append(_legend(labels, left, top + plot_h + 34))
    parts.append("</svg>")
    return "".join(parts)


def _time_chart(summary: EvalSummary) -> str:
    """Horizontal stacked bars of the mean seconds per rollout in each phase, one per scaffold."""
    left, row_h, bar_h, plot_w = 140, 26, 16, 520
    longest = max((s.timings.total_s for s in summary.scaffolds), default=0.0) or 1.0
    height = row_h * len(summary.scaffolds) + 36
    svg_w = left + plot_w + 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_w}" height="{height}" role="img">']
    for i, s in enumerate(summary.scaffolds):
        y, x = 8 + i * row_h, float(left)
        parts.append(_label(left - 8, y + 12, s.scaffold, anchor="end", room=20))
        for label, attr, colour in _TIME_PARTS:
            seconds = getattr(s.timings, attr)
            w = plot_w * seconds / longest
            if w > 0:
                tip = f"{s.scaffold} {label}: {seconds:.1f} s"
                parts.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                    f"<title>{_esc(tip)}</title></rect>"
                )
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 12}">{s.timings.total_s:.1f} s</text>')
    legend_y = 8 + len(summary.scaffolds) * row_h + 16
    parts.append(_legend([(label, colour) for label, _, colour in _TIME_PARTS], left, legend_y))
    parts.append("</svg>")
    return "".join(parts)


_FAILURE_WORDS = {"infra_failed": "infra failure", "verifier_failed": "verifier failure"}
_SHOWN_CHARS = 200  # of a reason in the table; the tooltip has all of it


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _attempts_text(errors: Sequence[str]) -> str:
    """``N failed attempt(s): first; second; third; +M more``."""
    shown = "; ".join(error[:_SHOWN_CHARS] for error in errors[:3])
    more = f"; +{len(errors) - 3} more" if len(errors) > 3 else ""
    return f"{_plural(len(errors), 'failed attempt')}: {shown}{more}"


def rollout_reason(result: RolloutResult) -> str:
    """Why a rollout did not solve its task, in a line the task table shows ("" when it did)."""
    if result.status != "done":
        word = _FAILURE_WORDS.get(result.status, result.status)
        after = f" after {_plural(result.attempts, 'attempt')}" if result.attempts > 1 else ""
        return f"{word}{after}: {result.details[:_SHOWN_CHARS]}"
    parts = []
    if not result.solved:
        ended = f"{result.ended_by or 'ended'} after {_plural(result.turns, 'turn')}"
        if result.cancelled_calls:
            ended += f" ({_plural(result.cancelled_calls, 'call')} cut off)"
        parts.append(ended + (f": {result.details[:_SHOWN_CHARS]}" if result.details else ""))
    if result.failed_attempts:
        parts.append("after " + _attempts_text(result.failed_attempts))
    return "; ".join(parts)


def _rollout_link(result: RolloutResult, trie_href: TrieHref | None, log_href: LogHref | None) -> str:
    """One rollout as a mark (✓ solved, ✗ not, ! infra failure, ? verifier failure) linking to its
    trie, plus its log and, when it did not solve the task, why not."""
    if result.status == "verifier_failed":
        kind, mark = "verifier", "?"
    elif result.status != "done":
        kind, mark = "infra", "!"
    else:
        kind, mark = ("ok", "✓") if result.solved else ("fail", "✗")
    reward = "-" if result.reward is None else f"{result.reward:g}"
    tip = f"{result.session_id} · {result.status} · reward {reward} · {result.ended_by or '-'}"
    if result.details:
        tip += f" · {result.details}"
    href = trie_href(result.session_id) if trie_href else None
    mark_html = (
        f'<a class="trie" href="{_esc(href)}" title="{_esc(tip)}">{mark}</a>'
        if href
        else f'<span class="trie" title="{_esc(tip)}">{mark}</span>'
    )
    log = log_href(result) if log_href else None
    log_html = f'<a class="log" href="{_esc(log)}" title="log">log</a>' if log else ""
    reason = rollout_reason(result)
    why = f' <span class="why">{_esc(reward)} · {_esc(reason)}</span>' if reason else ""
    return f'<div class="r {kind}">{mark_html}{log_html}{why}</div>'


def _unfinished_html(cell: TaskCell) -> str:
    if not cell.unfinished and not cell.failed_attempts:
        return ""
    parts = [f"{cell.unfinished} not run"] if cell.unfinished else []
    if cell.failed_attempts:
        parts.append(_attempts_text(cell.failed_attempts))
    text = parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")
    return f'<div class="why unfinished">{_esc(text)}</div>'


def _task_table(
    summary: EvalSummary,
    results: Sequence[RolloutResult],
    trie_href: TrieHref | None,
    log_href: LogHref | None,
) -> str:
    cells = {(c.task_id, c.scaffold): c for c in summary.cells}
    rollouts: dict[tuple[str, str], list[RolloutResult]] = {}
    for r in results:
        rollouts.setdefault((r.task_id, r.scaffold), []).append(r)
    names = [s.scaffold for s in summary.scaffolds]
    header = "<tr><th>task</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names) + "</tr>"
    rows = []
    for task_id in summary.task_ids:
        tds = [f"<td><code>{_esc(task_id)}</code></td>"]
        for name in names:
            cell = cells.get((task_id, name))
            if cell is None:
                tds.append('<td class="cell">—</td>')
                continue
            links = "".join(_rollout_link(r, trie_href, log_href) for r in rollouts.get((task_id, name), []))
            tip = f"mean {cell.mean_tokens:.0f} tok, {cell.mean_seconds:.1f} s per rollout"
            tds.append(
                f'<td class="cell" style="background:{_cell_colour(cell)}" title="{_esc(tip)}">'
                f'<span class="cn">{cell.c}/{cell.n}</span> {links}{_unfinished_html(cell)}</td>'
            )
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f'<table class="tasks">{header}{"".join(rows)}</table>'


def _render_html(
    summary: EvalSummary,
    results: Sequence[RolloutResult],
    *,
    title: str,
    meta: dict[str, Any],
    trie_href: TrieHref | None,
    log_href: LogHref | None,
) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        _meta_section(summary, meta),
    ]
    if not summary.results:
        parts.append('<p class="none">no results</p>')
    else:
        parts += [
            "<h2>Scaffolds</h2>",
            _scaffold_table(summary),
            (
                '<p class="small">Intervals: 95% percentile bootstrap over tasks. Means are per '
                "finished rollout; infra and verifier failures are never samples.</p>"
            ),
            "<h2>Pass rates</h2>",
            _pass_chart(summary),
            "<h2>Where the time goes (mean seconds per rollout)</h2>",
            _time_chart(summary),
            "<h2>Tasks</h2>",
            (
                '<p class="small">c/n: solved / finished samples. ✓ solved, ✗ not solved, ! infra '
                "failure, ? verifier failure (the task's verifier gave no reward), each with its reward "
                "and why it did not solve the task; each mark links to the rollout's trie, <em>log</em> "
                "to its log; <em>not run</em>: planned rollouts an interrupted run left undone.</p>"
            ),
            _task_table(summary, results, trie_href, log_href),
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    summary: EvalSummary,
    results: list[RolloutResult],
    out_dir: Path,
    *,
    title: str,
    meta: dict[str, Any],
    trie_href: TrieHref | None = None,
    log_href: LogHref | None = None,
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out_dir``; returns their paths, in that order.

    ``trie_href`` maps a session id to the address of its trie page and ``log_href`` a result to
    its log, both relative to ``out_dir`` as a rule; either may return None to leave a link out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "results.json", out_dir / "report.html"
    meta = _complete_meta(summary, meta)
    _write_json(json_path, summary, results, meta)
    page = _render_html(summary, results, title=title, meta=meta, trie_href=trie_href, log_href=log_href)
    html_path.write_text(page, encoding="utf-8")
    return json_path, html_path
