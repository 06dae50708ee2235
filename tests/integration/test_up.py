"""`arborl up` in a short mode, as a user runs it: one command starts the gateway, the rollout
workers and the learner on the tiny model; versions advance; a kill -9 of the learner and of the
rollout worker is survived; an external session is served and recorded; Ctrl-C stops it all and
a second start resumes the same run.

The tasks are Harbor folders graded by a regex on the agent's last answer, chosen so that the
tiny random model's text matches about half the time: groups then have rewards that differ, and
the learner has something to train on.
"""

from __future__ import annotations

import json
import os
import signal
from itertools import pairwise

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from up_runs import child_pid, kill_everything, last_step, query, start_up, up_config, wait_for

from arborl.ops.cli import main
from arborl.ops.run_figures import read_figures
from monitoring_names import shipped_metric_names

pytestmark = pytest.mark.slow

def test_arborl_up_trains_survives_kills_serves_others_and_resumes(run_root):
    config = up_config(run_root)
    run = run_root / "run"
    log = run_root / "up.log"
    up = start_up(config, log)
    try:
        wait_for(lambda: last_step(run) >= 2, "two training steps", log)
        url = json.loads((run / "up.json").read_text())["url"]

        # an external agent session, at the same time
        client = openai.OpenAI(base_url=url + "/s/my-own-session/v1", api_key="anything")
        reply = client.chat.completions.create(model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5)
        assert reply.choices[0].message.content is not None

        # kill -9 the learner and the rollout worker: both come back and carry on
        for name in ("learner", "rollouts"):
            pid = child_pid(run, name)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda name=name, pid=pid: child_pid(run, name) != pid, f"{name} restarted", log, 60)
        before = last_step(run)
        wait_for(lambda: last_step(run) >= before + 2, "two more steps after the kills", log)

        # every metric the shipped alerts and dashboard name is on a live /metrics, and parses
        settings = yaml.safe_load(config.read_text())["up"]
        live: set[str] = set()
        for endpoint in (url, f"http://127.0.0.1:{settings['learner_metrics_port']}",
                         f"http://127.0.0.1:{settings['rollout_metrics_port']}"):
            text = httpx.get(endpoint + "/metrics", timeout=10).text
            live |= {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
        assert shipped_metric_names() - live == set()
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if up.poll() is None:
            kill_everything(up, run)

    text = log.read_text()
    assert "arborl up: stopped" in text
    steps = last_step(run)
    served = query(run, "SELECT COUNT(*) FROM calls WHERE session_id = 'my-own-session'")
    assert served == [(1,)]  # the external session was recorded
    consumed = query(run, "SELECT consumed_step FROM groups WHERE consumed_step IS NOT NULL")
    assert len(consumed) >= steps  # one group per step, each consumed by exactly one step (a column)
    assert sorted({c for (c,) in consumed}) == list(range(1, steps + 1))
    assert query(run, "SELECT COUNT(*) FROM groups WHERE trainable = 0 AND consumed_step IS NOT NULL") == [(0,)]
    rewards = {r for (r,) in query(run, "SELECT reward FROM rollouts WHERE status = 'done'")}
    assert rewards == {0.0, 1.0}
    assert (run / "heldout" / "v0" / "results.json").is_file()  # the starting policy's held-out pass rate
    assert not query(run, "SELECT session_id FROM rollouts WHERE status = 'running'")
    main(["report", str(run)])  # the run's report: charts of what just happened
    report = (run / "report.html").read_text()
    assert "<svg" in report and f"{steps} (last step {steps})" in report

    # a second start resumes the run: the learner continues from its last committed step
    up = start_up(config, log)
    try:
        wait_for(lambda: last_step(run) > steps, "a step after the restart", log)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
    finally:
        if up.poll() is None:
            kill_everything(up, run)
    assert f"resumed at step {steps}" in (run / "logs" / "learner.log").read_text()


def test_synchronous_up_generates_each_group_with_the_policy_just_trained(run_root):
    """rollout.synchronous with max_staleness 0: generation and training take turns, so no
    group overlaps another, every group is trained on by the version that sampled it, and
    max_staleness 0 never drops one as stale."""
    config = up_config(run_root, rollout={"synchronous": True}, learner={"max_staleness": 0},
                       up={"heldout_every": 0})
    run = run_root / "run"
    log = run_root / "up.log"
    up = start_up(config, log)
    try:
        wait_for(lambda: last_step(run) >= 3, "three synchronous steps", log)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if up.poll() is None:
            kill_everything(up, run)

    steps = query(run, "SELECT step, version, metrics FROM train_steps ORDER BY step")
    assert [json.loads(metrics)["staleness_max"] for _, _, metrics in steps] == [0.0] * len(steps)
    assert query(run, "SELECT COUNT(*) FROM groups WHERE dropped = 'stale'") == [(0,)]
    groups = query(run, "SELECT id, created_at, completed_at, consumed_step, dropped FROM groups "
                        "WHERE trainable = 1 AND completed_at IS NOT NULL ORDER BY id")
    for (_, _, completed, _, _), (next_id, created, *_) in pairwise(groups):
        assert created >= completed, f"group {next_id} started before the one before it finished"
    # the group after one a step trained on was sampled once that step's version was served
    published = {step: json.loads(metrics).get("published_at") for step, _, metrics in steps}
    calls = {gid: query(run, "SELECT MIN(c.created_at) FROM calls c JOIN rollouts r ON r.session_id = c.session_id "
                             f"WHERE r.group_id = {gid}")[0][0] for gid, *_ in groups}
    for (_, _, _, consumed, _), (next_id, *_) in pairwise(groups):
        if consumed is not None and published.get(consumed) is not None:
            assert calls[next_id] >= published[consumed]

    # the loop's figures read from this run: every step trained, published and then served
    figures = read_figures(run)
    assert figures.rollouts == query(run, "SELECT COUNT(*) FROM rollouts WHERE status = 'done'")[0][0]
    assert figures.steps == len(steps) and 0 < figures.learner_busy_fraction < 1
    assert figures.latencies_s and all(latency > 0 for latency in figures.latencies_s)
