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
import sqlite3
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from arborl.ops.cli import main
from arborl.ops.run_figures import read_figures
from conftest import free_port
from monitoring_names import shipped_metric_names

pytestmark = pytest.mark.slow

ANSWER_PATTERN = r"(?i)\A\s*[a-m]"  # a first letter from a to m: about half of the tiny model's replies


def regex_tasks(root: Path) -> Path:
    for n in range(6):
        folder = root / f"say-{n}"
        folder.mkdir(parents=True)
        (folder / "instruction.md").write_text(f"Reply with a word that starts with a letter from a to m ({n}).\n")
        split = "heldout" if n >= 4 else "train"
        (folder / "task.toml").write_text(
            f'version = "1.0"\n\n[arborl]\nsplit = "{split}"\nverifier = "regex"\nexpected = \'{ANSWER_PATTERN}\'\n')
    return root


def up_config(root: Path, **sections: dict) -> Path:
    config = {
        "run_dir": str(root / "run"),
        "engine": {"model": "tiny-random-llama", "max_running": 4},
        "gateway": {"port": free_port()},
        "rollout": {"group_size": 4, "concurrency": 2, "max_turns": 1, "max_tokens": 12, "temperature": None},
        "learner": {"lr": 1e-3, "groups_per_step": 1, "max_staleness": 8, "token_budget": 2048,
                    "attention": "arborl_tree_sdpa", "poll_interval_s": 0.2},
        "up": {"dataset": str(regex_tasks(root / "tasks")), "heldout_every": 2, "train_difficulty": None,
               "learner_metrics_port": free_port(),
               "rollout_metrics_port": free_port(), "max_restarts": 3},
    }
    for name, values in sections.items():
        config[name].update(values)
    path = root / "arborl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_up(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "arborl.ops.cli", "up", "--config", str(config)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def query(run: Path, sql: str) -> list[tuple]:
    path = run / "store.sqlite"
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def wait_for(condition, what: str, log: Path, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def last_step(run: Path) -> int:
    rows = query(run, "SELECT MAX(step) FROM train_steps")
    return rows[0][0] or 0 if rows else 0


def child_pid(run: Path, name: str) -> int:
    return json.loads((run / "up.json").read_text())["children"][name]


def kill_everything(up: subprocess.Popen, run: Path) -> None:
    """After a failure: the supervisor and every child it started (each has its own session)."""
    pids = [up.pid]
    if (run / "up.json").is_file():
        pids += json.loads((run / "up.json").read_text())["children"].values()
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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
