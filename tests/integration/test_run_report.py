"""`arborl report RUN`: a run folder built with the real ledger, controls and held-out reports,
drawn as one self-contained, escaped page; and a run with nothing trained yet."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from arborl.ops.cli import main
from arborl.ops.eval_report import summarize, write_report
from arborl.ops.svg_charts import Series, line_chart, nice_ticks
from arborl.rollout.results import RolloutResult
from arborl.rollout.store import LEARNER_OVERRIDES, RunControls, RunLedger, SqliteTrajectoryStore, TrajectoryStore

EVIL = "evil<script>alert(1)</script>"
TITLES = ["Reward", "Pass rate", "Entropy", "Train-rollout mismatch", "Clipping and IcePop", "Throughput",
          "Publish (swap) times", "Loss and gradient norm", "Operator actions (last 20, newest first)"]
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}
SVG_EMPTY = {"line", "rect", "circle", "polyline", "text"}  # closed explicitly or self-closed


class StrictParser(HTMLParser):
    """Fails on a closing tag that does not match the open one, so the nesting is checked."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def _parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    return parser


def _metrics(step: int) -> dict:
    return {
        "loss": 0.5 / step, "entropy": 1.2 - 0.1 * step, "clip_frac": 0.02 * step, "icepop_zeroed_frac": 0.001 * step,
        "mismatch_abs": 0.01 + 0.002 * step, "mismatch_kl": 1e-4 * step, "grad_norm": 0.8 + 0.1 * step,
        "tokens_per_second": 4000.0 + 100 * step, "reward_mean": 0.25 * step, "lr": 1e-6, "step_seconds": 3.5,
        "staleness_max": 1.0, "staleness_mean": 0.5, "tokens": 14000.0, "groups": [step],
    }


def _heldout(run: Path, version: int, solved: int) -> None:
    """A held-out report as `arborl eval` writes it: 4 tasks, one rollout each, ``solved`` solved."""
    results = [
        RolloutResult(session_id=f"h{version}-{i}", task_id=f"task-{i}", scaffold=scaffold, group_id=100 + i,
                      status="done", reward=float(i < solved), solved=i < solved)
        for i in range(4) for scaffold in ("builtin", EVIL)
    ]
    write_report(summarize(results, 1), results, run / "heldout" / f"v{version}", title=f"held-out v{version}",
                 meta={"policy_version": version})


def _build_run(run: Path) -> TrajectoryStore:
    store = SqliteTrajectoryStore(run / "store.sqlite")
    ledger = RunLedger(store)
    groups = []
    for g in range(6):
        scaffold = EVIL if g == 1 else "builtin"
        group = ledger.open_group(f"task-{g}", 4)
        groups.append(group)
        for i in range(4):
            ledger.start_rollout(f"s{g}-{i}", group, scaffold=scaffold)
            if g < 2 and i == 0:  # an infrastructure failure, then its retry
                ledger.fail_rollout(f"s{g}-{i}", "sandbox did not start")
                ledger.start_rollout(f"s{g}-{i}-retry", group, scaffold=scaffold)
                ledger.finish_rollout(f"s{g}-{i}-retry", 1.0)
            else:
                ledger.finish_rollout(f"s{g}-{i}", 1.0 if i < g % 4 else 0.0)
    evaluation = ledger.open_group("heldout-task", 1, trainable=False)
    ledger.start_rollout("eval-0", evaluation, scaffold="builtin")
    ledger.finish_rollout("eval-0", 1.0)
    ledger.drop_groups([groups[5]], "stale")
    for step in range(1, 5):
        metrics = _metrics(step)
        if step > 1:  # publishing started with the second version
            metrics["publish_seconds"] = 0.4 + 0.1 * step
        ledger.commit_step(step, step, f"/fake/checkpoints/step_{step}", [groups[step - 1]], metrics)
    RunControls(store).act("alice", "set", {"lr": 1e-6, "note": "<b>by hand</b>"}, {LEARNER_OVERRIDES: {"lr": 1e-6}})
    # spread the 27 rollouts over 26.5 minutes, as a real run would (the ledger stamps them with now)
    with store.transaction() as db:
        sessions = [row[0] for row in db.execute("SELECT session_id FROM rollouts ORDER BY rowid")]
        start = 1_700_000_000.0
        db.executemany("UPDATE rollouts SET created_at = ?, finished_at = ? WHERE session_id = ?",
                       [(start + 60 * i, start + 60 * i + 30, s) for i, s in enumerate(sessions)])
        db.execute("UPDATE train_steps SET created_at = ? + step * 300", (start,))
        db.execute("UPDATE admin_actions SET at = ?", (start + 1500,))
    _heldout(run, 0, 1)
    _heldout(run, 2, 3)
    return store


def test_report_of_a_run_with_steps_rollouts_heldout_and_actions(run_root, capsys):
    run = run_root / "run"
    store = _build_run(run)  # left open, as during a live run: the report reads beside the writer
    try:
        main(["report", str(run)])
    finally:
        store.close()
    path = run / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = path.read_text()
    parser = _parse(page)
    for title in TITLES:
        assert f"<h2>{title}</h2>" in page
    assert "script" not in parser.tags and "<script" not in page.lower()
    assert "evil&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a scaffold, in the header and held-out
    assert "&lt;b&gt;by hand&lt;/b&gt;" in page and "alice" in page and "<td>set</td>" in page
    assert "<link" not in page and " src=" not in page  # self-contained

    assert "4 (last step 4)" in page and "<td>v4</td>" in page
    assert "24 done, 2 infra_failed, 0 running" in page  # 6 groups of 4, and 2 failures retried
    assert "4 trained, 1 dropped (stale 1), 1 waiting" in page  # group 5 waits
    assert "1 (held-out, never trained on)" in page
    assert "26 min 30 s" in page  # the first rollout's start to the last one's finish
    assert "25.0%" in page and "75.0%" in page  # held-out pass@1, v0 and v2
    assert "<td class=\"num\">v2</td>" in page
    assert "no publish times recorded" not in page and "publish" in page
    assert "no training steps yet" not in page
    assert page.count("<svg") == 13
    assert page.count("<polyline") >= 16  # no chart silently left empty


@pytest.mark.parametrize("with_rollouts", [False, True])
def test_report_of_a_run_with_no_steps_yet(run_root, capsys, with_rollouts):
    run = run_root / "run"
    store = SqliteTrajectoryStore(run / "store.sqlite")  # no rows in the ledger, unless rollouts came
    if with_rollouts:
        ledger = RunLedger(store)
        group = ledger.open_group("task", 2)
        for i, reward in enumerate((0.0, 1.0)):
            ledger.start_rollout(f"s{i}", group, scaffold="builtin")
            ledger.finish_rollout(f"s{i}", reward)
    store.close()
    main(["report", str(run)])
    page = Path(capsys.readouterr().out.strip()).read_text()
    _parse(page)
    for title in TITLES:
        assert f"<h2>{title}</h2>" in page
    assert '<p class="none">no training steps yet</p>' in page
    assert "no publish times recorded" in page and "no held-out evaluations yet" in page
    assert "no operator actions yet" in page
    assert ("<polyline" in page) == with_rollouts  # the rolling reward needs no step
    assert ("2 done, 0 infra_failed" in page) == with_rollouts


def test_report_needs_a_store(run_root):
    with pytest.raises(SystemExit, match="no store"):
        main(["report", str(run_root / "nothing")])


def test_chart_scales():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(1, 4, integer=True) == [1, 2, 3, 4]
    assert nice_ticks(3, 3)[0] < 3 < nice_ticks(3, 3)[-1]  # a flat series still gets a range
    assert "no data" in line_chart([Series("x", [(0, math.nan)])], x_label="step", empty="no data")
    chart = line_chart([Series("a<b>", [(1, 2.0), (2, 3.0)])], x_label="step")
    assert "a&lt;b&gt;" in chart and "<b>" not in chart
    long = line_chart([Series("many", [(i, i % 7) for i in range(5000)])], x_label="minutes")
    points = long.split('<polyline points="')[1].split('"')[0].split()
    assert 900 <= len(points) <= 1001 and long.count("<circle") == 1  # thinned; only the last point dotted
