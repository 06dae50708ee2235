"""What Ray placement costs the loop: `arborl up` on one machine against `arborl up --ray` on a
two-node Ray cluster on the same machine, the same configuration for the same minutes, in one run.

    .venv/bin/python tests/bench/bench_ray.py --minutes 3

Both runs use the short configuration of the `arborl up` tests (the tiny model, a regex-graded
dataset it half solves, groups of 4; tests/up_runs.py), from fresh run folders. Under Ray the
rollout workers and the gateway are placed on the head's node and the learner on the second (the
placement test's layout). Rollouts per hour are counted over the same window of each run: from
its first finished rollout to its end (start-up is not steady state: Ray adds its actors'
start). Prints the table and writes results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests' helpers

from ray_cluster import HEAD_IP, RAY_ENV, two_node_cluster  # noqa: E402
from up_runs import kill_everything, up_config  # noqa: E402


def run_for(config: Path, minutes: float, extra: list[str], log: Path) -> subprocess.Popen:
    up = subprocess.Popen([sys.executable, "-m", "arborl.ops.cli", "up", "--config", str(config), *extra],
                          stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=RAY_ENV)
    started = time.monotonic()
    while time.monotonic() - started < minutes * 60:
        time.sleep(5)
        print(f"\r  {extra and 'ray' or 'plain'}: {time.monotonic() - started:.0f} / {minutes * 60:.0f} s",
              end="", file=sys.stderr, flush=True)
        if up.poll() is not None:
            sys.exit(f"\narborl up exited {up.returncode}: {log.read_text()[-3000:]}")
    print(file=sys.stderr)
    return up


def figures(run: Path, ended_at: float) -> dict:
    db = sqlite3.connect(f"file:{run / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        first = db.execute("SELECT MIN(finished_at) FROM rollouts WHERE status = 'done'").fetchone()[0]
        done = db.execute("SELECT COUNT(*) FROM rollouts WHERE status = 'done' AND finished_at <= ?",
                          (ended_at,)).fetchone()[0]
        steps = db.execute("SELECT COUNT(*) FROM train_steps").fetchone()[0]
    finally:
        db.close()
    hours = (ended_at - first) / 3600
    return {"rollouts": done, "window_s": ended_at - first, "rollouts_per_hour": (done - 1) / hours,
            "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="arborl-bench-ray-"))
    top.chmod(0o711)
    results = {}
    with two_node_cluster(top / "ray.log") as cluster:
        if cluster is None:
            sys.exit(f"the Ray cluster did not come up: {(top / 'ray.log').read_text()[-2000:]}")
        for mode, extra in (("plain", []), ("ray", ["--ray", cluster.address, "--ray-node-ip", HEAD_IP])):
            root = top / mode
            root.mkdir()
            root.chmod(0o711)
            config = up_config(root, up={"heldout_every": 0, "ray_parts": {
                "gateway": {"prefer": "node1"}, "rollouts": {"prefer": "node1"}, "learner": {"prefer": "node2"}}})
            up = run_for(config, args.minutes, extra, root / "up.log")
            ended_at = time.time()
            up.send_signal(signal.SIGINT)
            try:
                up.wait(timeout=180)
            except subprocess.TimeoutExpired:
                kill_everything(up, root / "run")
            results[mode] = figures(root / "run", ended_at)
    ratio = results["ray"]["rollouts_per_hour"] / results["plain"]["rollouts_per_hour"]
    print(f"\n`arborl up` for {args.minutes:g} minutes each, tiny model, one machine (2 Ray nodes for --ray)\n")
    print("| mode | rollouts | window | rollouts / hour | vs plain | steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, row in results.items():
        print(f"| {mode} | {row['rollouts']} | {row['window_s']:.0f} s | {row['rollouts_per_hour']:.0f} | "
              f"{row['rollouts_per_hour'] / results['plain']['rollouts_per_hour']:.2f}x | {row['steps']} |")
    out = HERE / "results" / "ray_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"minutes": args.minutes, **results, "ratio": ratio}, indent=2) + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
