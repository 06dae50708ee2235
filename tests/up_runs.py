"""Helpers for tests that run `arborl up` as a user does (tests/integration/test_up.py,
test_ray_placement.py): a small regex-graded Harbor dataset the tiny model half solves, a short
configuration, and reading the run's SQLite store from outside."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port

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
