"""`arborl eval`'s statistics and report: pass@k against its definition, exact summaries of
hand-made results, seeded bootstrap intervals, and a report that is escaped and round-trips."""

from __future__ import annotations

import html
import json
from fractions import Fraction
from html.parser import HTMLParser
from itertools import combinations

import pytest

from arborl.ops.eval_report import Planned, load_results, pass_at_k, summarize, write_report
from arborl.rollout.results import NO_ACTION, SUBMITTED, TURN_LIMIT, RolloutResult, Timings

T1, T2, T3 = "t1", "t2", "t3<script>alert(1)</script>"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


# -- pass@k -------------------------------------------------------------------------------------


def _brute_force(n: int, c: int, k: int) -> Fraction:
    """The definition: the share of k-subsets of n samples (the first c solved) holding a solved one."""
    subsets = list(combinations(range(n), k))
    return Fraction(sum(any(i < c for i in subset) for subset in subsets), len(subsets))


def test_pass_at_k_matches_enumeration_over_all_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every 3-subset holds a solved sample
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert 0.0 < pass_at_k(200, 1, 100) <= 1.0  # large n stays finite (product form)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (0, 0, 1), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# -- summarize ----------------------------------------------------------------------------------


def _result(session: str, task: str, scaffold: str, solved: bool, **kw) -> RolloutResult:
    fields = {
        "status": "done",
        "reward": 1.0 if solved else 0.0,
        "resolution": "FULL" if solved else "NO",
        "ended_by": SUBMITTED if solved else TURN_LIMIT,
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "timings": Timings(total_s=10.0, model_s=4.0, tools_s=3.0, verify_s=1.0),
        "log": f"logs/{session}.log",
    }
    fields.update(kw)
    return RolloutResult(
        session_id=session, task_id=task, scaffold=scaffold, group_id=0, solved=solved, **fields
    )


def _hand_made() -> list[RolloutResult]:
    """Two scaffolds, three tasks, k=3; alpha lost one t3 rollout to the infrastructure."""
    big = {"prompt_tokens": 200, "completion_tokens": 30}
    big["timings"] = Timings(total_s=14.0, model_s=6.0, tools_s=4.0, verify_s=1.0)
    alpha = [
        _result("a-t1-0", T1, "alpha", True),
        _result("a-t1-1", T1, "alpha", False),
        _result("a-t1-2", T1, "alpha", False),
        *(_result(f"a-t2-{i}", T2, "alpha", True, **big) for i in range(3)),
        _result("a-t3-0", T3, "alpha", False),
        RolloutResult(
            session_id="a-t3-1",
            task_id=T3,
            scaffold="alpha",
            group_id=0,
            status="infra_failed",
            details="sandbox <did not> start",
            attempts=3,
            timings=Timings(total_s=100.0, setup_s=100.0),
        ),
        _result("a-t3-2", T3, "alpha", True),
    ]
    beta = [
        _result("b-t1-0", T1, "beta", False),
        _result("b-t1-1", T1, "beta", False),
        _result("b-t1-2", T1, "beta", True),
        *(_result(f"b-t2-{i}", T2, "beta", False) for i in range(3)),
        _result("b-t3-0", T3, "beta", False, reward=0.5, resolution="PARTIAL"),
        _result("b-t3-1", T3, "beta", False, reward=0.5, resolution="PARTIAL"),
        _result("b-t3-2", T3, "beta", False, ended_by=NO_ACTION),
    ]
    return beta + alpha  # out of order on purpose: the summary sorts


def test_summarize_hand_made_results_exactly():
    summary = summarize(_hand_made(), 3)
    assert summary.k == 3
    assert [s.scaffold for s in summary.scaffolds] == ["alpha", "beta"]
    assert summary.task_ids == (T1, T2, T3)
    assert (summary.results, summary.rollouts, summary.infra_failed, summary.solved) == (18, 17, 1, 6)

    alpha = summary.scaffold("alpha")
    assert (alpha.tasks, alpha.rollouts, alpha.infra_failed) == (3, 8, 1)
    assert sorted(alpha.pass_at) == [1, 2, 3]
    assert alpha.pass_at[1].value == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # 11/18
    assert alpha.pass_at[2].value == pytest.approx((2 / 3 + 1 + 1) / 3)  # 8/9
    assert alpha.pass_at[3].value == pytest.approx(1.0)  # t3 has only 2 samples: left out
    assert [alpha.pass_at[k].tasks for k in (1, 2, 3)] == [3, 3, 2]
    assert (alpha.pass_at[3].low, alpha.pass_at[3].high) == (1.0, 1.0)
    assert alpha.mean_reward == pytest.approx(5 / 8)
    assert alpha.mean_prompt_tokens == pytest.approx(137.5)  # the infra failure is no sample
    assert alpha.mean_completion_tokens == pytest.approx(17.5)
    assert alpha.mean_seconds == pytest.approx(11.5)
    assert alpha.timings.model_s == pytest.approx(4.75)
    assert alpha.timings.tools_s == pytest.approx(3.375)
    assert alpha.timings.verify_s == pytest.approx(1.0)
    assert alpha.timings.overhead_s == pytest.approx(2.375)
    assert alpha.timings.total_s == pytest.approx(alpha.mean_seconds)
    assert alpha.resolutions == {"FULL": 5, "NO": 3}
    assert alpha.ended_by == {SUBMITTED: 5, TURN_LIMIT: 3}

    beta = summary.scaffold("beta")
    assert (beta.tasks, beta.rollouts, beta.infra_failed) == (3, 9, 0)
    assert beta.pass_at[1].value == pytest.approx(1 / 9)
    assert beta.pass_at[2].value == pytest.approx(2 / 9)
    assert beta.pass_at[3].value == pytest.approx(1 / 3)
    assert [beta.pass_at[k].tasks for k in (1, 2, 3)] == [3, 3, 3]
    assert beta.mean_reward == pytest.approx(2 / 9)
    assert beta.resolutions == {"FULL": 1, "NO": 6, "PARTIAL": 2}
    assert beta.ended_by == {NO_ACTION: 1, SUBMITTED: 1, TURN_LIMIT: 7}

    cell = summary.cell(T3, "alpha")
    assert (cell.n, cell.c, cell.infra_failed) == (2, 1, 1)
    assert cell.rewards == [0.0, 1.0]
    assert cell.session_ids == ["a-t3-0", "a-t3-2"]
    assert cell.mean_tokens == pytest.approx(110.0)
    assert cell.mean_seconds == pytest.approx(10.0)
    t2 = summary.cell(T2, "alpha")
    assert (t2.n, t2.c, t2.mean_tokens, t2.mean_seconds) == (3, 3, 230.0, 14.0)
    assert summary.cell(T3, "beta").rewards == [0.5, 0.5, 0.0]
    assert [(c.task_id, c.scaffold) for c in summary.cells] == [
        (t, s) for t in (T1, T2, T3) for s in ("alpha", "beta")
    ]
    for s in summary.scaffolds:
        for rate in s.pass_at.values():
            assert rate.low <= rate.value <= rate.high


def test_summarize_rejects_k_below_one():
    with pytest.raises(ValueError):
        summarize([], 0)


def _one_sample_tasks(count: int) -> list[RolloutResult]:
    return [_result(f"s{i}", f"task{i:03d}", "x", solved=i % 2 == 0) for i in range(count)]


def test_bootstrap_interval_is_seeded_contains_estimate_and_narrows_with_tasks():
    few = summarize(_one_sample_tasks(10), 1, seed=7).scaffolds[0].pass_at[1]
    again = summarize(_one_sample_tasks(10), 1, seed=7).scaffolds[0].pass_at[1]
    many = summarize(_one_sample_tasks(200), 1, seed=7).scaffolds[0].pass_at[1]
    assert few == again
    assert few.value == pytest.approx(0.5) and many.value == pytest.approx(0.5)
    assert few.low <= few.value <= few.high and few.low < few.high
    assert many.low <= many.value <= many.high
    assert many.high - many.low < few.high - few.low
    single = summarize(_one_sample_tasks(1), 1).scaffolds[0].pass_at[1]
    assert single.low == single.high == single.value == 1.0 and single.tasks == 1


# -- the report ---------------------------------------------------------------------------------


class StrictParser(HTMLParser):
    """Fails on a closing tag that does not match the open one, so the nesting is checked."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.hrefs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in VOID:
            self.stack.append(tag)
        self.hrefs += [value for name, value in attrs if name == "href" and value]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def _parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    return parser


META = {"dataset": "tiny<set>", "model": "SmolLM2", "policy_version": 4, "k": 3, "date": "2025-01-02"}


def test_write_report_writes_escaped_html_and_round_trip_json(tmp_path):
    results = _hand_made()
    summary = summarize(results, 3)
    json_path, html_path = write_report(
        summary,
        results,
        tmp_path / "out",
        title="eval <tiny>",
        meta=META,
        trie_href=lambda sid: f"trie/{sid}.html",
        log_href=lambda r: r.log or None,
    )
    assert (json_path.name, html_path.name) == ("results.json", "report.html")
    assert load_results(json_path) == results
    data = json.loads(json_path.read_text())
    assert data["meta"] == META
    assert data["summary"]["scaffolds"][0]["pass_at"]["2"]["value"] == pytest.approx(8 / 9)

    page = html_path.read_text()
    parser = _parse(page)
    assert "<script" not in page and "script" not in parser.tags
    assert not any(h.startswith(("http:", "https:", "//")) for h in parser.hrefs)  # self-contained
    for task_id in (T1, T2, T3):
        assert f"<code>{html.escape(task_id)}</code>" in page
    assert "sandbox &lt;did not&gt; start" in page  # details, in the infra failure's tooltip
    assert "eval &lt;tiny&gt;" in page and "tiny&lt;set&gt;" in page
    done = [r for r in results if r.status == "done"]
    assert {f"trie/{r.session_id}.html" for r in results} <= set(parser.hrefs)
    assert {f"logs/{r.session_id}.log" for r in done} <= set(parser.hrefs)
    assert page.index("tiny&lt;set&gt;") < page.index("<h2>Scaffolds</h2>")  # meta at the top
    assert page.count("<svg") == 2  # the pass-rate and the time charts
    for cn in ("1/3", "3/3", "1/2", "0/3"):  # c/n cells
        assert f'<span class="cn">{cn}</span>' in page
    for rate in ("61.1%", "100.0%", "11.1%", "33.3%"):  # pass@1 and pass@3 of alpha, then beta
        assert f"<td>{rate} " in page
    assert ">alpha<" in page and ">beta<" in page


def test_report_without_links_has_no_anchors(tmp_path):
    results = _hand_made()
    _, html_path = write_report(summarize(results, 1), results, tmp_path, title="t", meta={})
    page = html_path.read_text()
    assert _parse(page).hrefs == []
    assert "<th>k</th><td>1</td>" in page  # k and a date are filled in when meta lacks them
    assert "<th>date</th>" in page


def test_report_with_no_results(tmp_path):
    summary = summarize([], 3)
    assert summary.scaffolds == () and summary.results == 0
    json_path, html_path = write_report(summary, [], tmp_path, title="empty", meta={"dataset": "d"})
    page = html_path.read_text()
    _parse(page)
    assert "no results" in page
    assert load_results(json_path) == []


class TextOnly(HTMLParser):
    """The page's visible text: what a reader sees without hovering (no attributes, no tooltips)."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        self._hidden += tag in ("title", "style")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("title", "style")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)

    @classmethod
    def of(cls, page: str) -> str:
        parser = cls()
        parser.feed(page)
        return " ".join(" ".join(parser.parts).split())


def test_the_task_table_says_why_a_rollout_failed(tmp_path):
    from arborl.rollout.results import TIME_LIMIT

    results = [
        _result("timed", T1, "alpha", False, ended_by=TIME_LIMIT, turns=0, cancelled_calls=1,
                details="FAIL_TO_PASS 0/1, PASS_TO_PASS 0/0: RESOLVED_NO"),
        RolloutResult(session_id="broken", task_id=T2, scaffold="alpha", group_id=0, status="verifier_failed",
                      details="the script ran out of time (45 s)", attempts=3),
        _result("retried", T3, "alpha", False, attempts=2, failed_attempts=("the sandbox did not start: no <space>",)),
    ]
    _, html_path = write_report(summarize(results, 1), results, tmp_path, title="t", meta={})
    text = TextOnly.of(html_path.read_text())
    assert "time_limit after 0 turns (1 call cut off)" in text
    assert "verifier failure after 3 attempts: the script ran out of time (45 s)" in text
    assert "after 1 failed attempt: the sandbox did not start: no <space>" in text  # escaped in the page, shown as is


def test_an_interrupted_eval_shows_every_planned_task_and_what_became_of_it(tmp_path):
    results = [_result("done", T1, "alpha", True)]
    planned = [Planned(T1, "alpha", 2), Planned(T2, "alpha", 2, failed_attempts=("interrupted",)),
               Planned(T2, "beta", 2)]
    summary = summarize(results, 2, planned=planned)
    assert summary.task_ids == (T1, T2) and [s.scaffold for s in summary.scaffolds] == ["alpha", "beta"]
    assert summary.unfinished == 5  # one of T1's two, both of T2's under each scaffold
    assert (summary.cell(T1, "alpha").unfinished, summary.cell(T2, "beta").unfinished) == (1, 2)
    _, html_path = write_report(summary, results, tmp_path, title="t", meta={"complete": False})
    page = html_path.read_text()
    _parse(page)
    text = TextOnly.of(page)
    assert f"{T2}" in text and "2 not run" in text and "1 not run" in text
    assert "1 failed attempt: interrupted" in text
