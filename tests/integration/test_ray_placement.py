"""`arborl up --ray` on a real two-node Ray cluster on this machine: a head (127.0.0.2, resource
``node1``) and a second node (127.0.0.3, resource ``node2``), one CPU each. The rollout workers
are placed on the head's node and the learner on the second; the loop trains; kill -9 of the
second node's raylet takes the learner's node away; the learner is placed again on the surviving
node and the loop goes on; every group is trained exactly once (from the store).

The cluster is tests/ray_cluster.py's; one that does not come up (Ray under a heavy load) is
tried once more, then the test is skipped with Ray's own words.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster import HEAD_IP, RAY_ENV, SECOND_IP, RayCluster, two_node_cluster
from up_runs import child_pid, kill_everything, last_step, query, up_config, wait_for

from arborl.ops.cli import main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[RayCluster]:
    with two_node_cluster(tmp_path / "ray.log") as cluster:
        if cluster is None:
            pytest.skip(f"a two-node Ray cluster did not come up here: {(tmp_path / 'ray.log').read_text()[-1500:]}")
        yield cluster


def placement(run: Path) -> dict[str, str]:
    events = (run / "logs" / "rollouts.log", run / "logs" / "learner.log")
    where = {}
    for path in events:
        text = path.read_text() if path.is_file() else ""
        marks = [line for line in text.splitlines() if "arborl up (ray) starts it on" in line]
        if marks:
            where[path.stem] = marks[-1].rsplit(" ", 1)[1]
    return where


def since_placed_on(run: Path, ip: str) -> str:
    """The learner's log since it was last started on ``ip`` ("" if it never was)."""
    text = (run / "logs" / "learner.log").read_text()
    mark = f"arborl up (ray) starts it on {ip}\n"
    return text.rsplit(mark, 1)[1] if mark in text else ""


def test_arborl_up_on_two_ray_nodes_survives_the_learners_node(two_nodes: RayCluster, run_root: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]):
    config = up_config(run_root, up={"heldout_every": 0, "ray_parts": {
        "gateway": {"prefer": "node1"}, "rollouts": {"prefer": "node1"}, "learner": {"prefer": "node2"}}})
    run = run_root / "run"
    log = run_root / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "arborl.ops.cli", "up", "--config", str(config), "--ray",
                           two_nodes.address, "--ray-node-ip", HEAD_IP], stdout=open(log, "ab"),
                          stderr=subprocess.STDOUT, start_new_session=True, env=RAY_ENV)
    try:
        wait_for(lambda: last_step(run) >= 2, "two training steps", log, timeout_s=600)
        assert placement(run) == {"rollouts": HEAD_IP, "learner": SECOND_IP}
        assert json.loads((run / "up.json").read_text())["url"].startswith(f"http://{HEAD_IP}:")

        raylet = two_nodes.raylet(SECOND_IP)
        old_learner = child_pid(run, "learner")
        assert raylet is not None
        killed_at = time.monotonic()
        os.kill(raylet, signal.SIGKILL)
        wait_for(lambda: placement(run).get("learner") == HEAD_IP, "the learner placed again on the head", log,
                 timeout_s=300)
        placed_s = time.monotonic() - killed_at
        # the learner never runs twice: its process on the lost node stopped (its actor is gone)
        wait_for(lambda: not Path(f"/proc/{old_learner}").exists(), "the old learner's process gone", log,
                 timeout_s=60)
        # a step committed by the learner on its new node (the old one may commit the step it was
        # in: the ledger refuses a group twice, so the two cannot both train one)
        wait_for(lambda: "committed version" in since_placed_on(run, HEAD_IP), "a step by the learner on its new node",
                 log, timeout_s=600)
        assert "resumed at step" in since_placed_on(run, HEAD_IP)
        # operating the run works as on one machine: the gateway found from up.json, on its node's address
        main(["ops", "status", "--run-dir", str(run)])
        status = capsys.readouterr().out
        assert "training_paused: False" in status and "served_version: " in status
        print(f"\nnode death -> learner placed again: {placed_s:.1f} s; -> its first committed step: "
              f"{time.monotonic() - killed_at:.1f} s")
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=180) == 0, log.read_text()[-4000:]
    finally:
        if up.poll() is None:
            kill_everything(up, run)
        shutil.copytree(run / "logs", tmp_path / "logs", dirs_exist_ok=True)  # kept by pytest, to read after
        shutil.copy(log, tmp_path / "up.log")
    steps = last_step(run)
    consumed = query(run, "SELECT consumed_step FROM groups WHERE consumed_step IS NOT NULL")
    # every committed step, before and after the node's death, consumed groups of its own (a group
    # holds the one step that consumed it), and the steps follow each other without a gap
    assert sorted({c for (c,) in consumed}) == list(range(1, steps + 1))
    assert [s for (s,) in query(run, "SELECT step FROM train_steps ORDER BY step")] == list(range(1, steps + 1))
    rollouts_log = (run / "logs" / "rollouts.log").read_text()[-3000:]
    assert not query(run, "SELECT session_id FROM rollouts WHERE status = 'running'"), rollouts_log
    # the live view's lines (not a terminal here) read the run as on one machine
    assert re.search(r"^step \d+ v\d+ \(serving v0\) \| rollouts \d+ done", log.read_text(), re.MULTILINE)
    main(["report", str(run)])  # the run's report reads the store as on one machine
    assert f"{steps} (last step {steps})" in (run / "report.html").read_text()
