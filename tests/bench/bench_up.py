"""`arborl up` end to end on this machine: the learning curve, and asynchronous versus synchronous.

    .venv/bin/python tests/bench/bench_up.py curve --minutes 60 --marks 30,60
    .venv/bin/python tests/bench/bench_up.py sync --minutes 10

``curve`` runs ``arborl up`` with its defaults (the default model, the builtin agent on the
built-in train split) for ``--minutes``; at each mark it copies the newest committed checkpoint's
weights aside. The run's own held-out evaluation is off (``--heldout-every 0``): on 2 cores it
would take the CPU from training. Afterwards the starting model and each copy are evaluated on
the whole built-in held-out split, ``--k`` rollouts per task, with the same agent settings as the
run's rollouts, and the script prints held-out pass@1 per mark, the run's rollouts per hour,
learner busy fraction and reward-to-served latency (ops/run_figures.py), and writes the chart
(``--chart``, the README's) and ``results/up_curve.json``.

``sync`` runs ``arborl up`` twice on the same configuration for ``--minutes`` each, from fresh
run folders: asynchronous (the default) and synchronous (``rollout.synchronous`` with
``learner.max_staleness 0``: generation waits for the learner, rollout/learner_gate.py). It
prints rollouts per hour of each and their ratio, and the learner's busy fraction, measured over
the same window of each run (from its first rollout to the end), and writes
``results/up_sync.json``.

Both need an otherwise idle machine: the figures are rates of a CPU-bound loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

from arborl.ops.config import UP_DEFAULTS
from arborl.ops.run_figures import read_figures
from arborl.ops.svg_charts import Series, line_chart
from arborl.rollout.store import read_only

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[2]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_up(run: Path, config: dict, log_path: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run), **config}))
    return subprocess.Popen([sys.executable, "-m", "arborl.ops.cli", "up", "--config", str(path), "--heldout-every",
                             "0"], stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_up(up: subprocess.Popen) -> None:
    up.send_signal(signal.SIGINT)
    try:
        up.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()


def committed(run: Path) -> tuple[int, str] | None:
    """(version, checkpoint folder) of the last committed step."""
    path = run / "store.sqlite"
    if not path.is_file():
        return None
    db = read_only(path)
    try:
        row = db.execute("SELECT version, checkpoint FROM train_steps ORDER BY step DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        db.close()
    return (int(row[0]), row[1]) if row else None


def snapshot(run: Path, out: Path) -> int:
    """Copy the newest checkpoint's weights (not the optimiser state) to ``out``; its version."""
    last = committed(run)
    if last is None:
        return 0
    version, folder = last
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("training_state.pt"))
    return version


def run_for(up: subprocess.Popen, seconds: float, marks: dict[float, callable], status) -> None:
    started = time.monotonic()
    pending = sorted(marks)
    while time.monotonic() - started < seconds:
        if up.poll() is not None:
            raise SystemExit(f"arborl up exited ({up.returncode})")
        elapsed = time.monotonic() - started
        while pending and elapsed >= pending[0]:
            marks[pending.pop(0)]()
        status(elapsed)
        time.sleep(min(30.0, max(1.0, seconds - elapsed)))
    for mark in pending:
        marks[mark]()


def heldout_eval(model: str, run: Path, k: int, log_path: Path) -> dict:
    config = run.parent / f"{run.name}.yaml"
    config.write_text(yaml.safe_dump({"rollout": UP_DEFAULTS["rollout"]}))
    argv = [sys.executable, "-m", "arborl.ops.cli", "eval", "--config", str(config), "--model", model, "--dataset",
            "builtin", "--split", "heldout", "--scaffold", "builtin", "--k", str(k), "--run-dir", str(run)]
    with open(log_path, "ab") as out:
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((run / "eval" / "results.json").read_text())["summary"]["scaffolds"][0]
    return {"pass_at_1": summary["pass_at"]["1"], "rollouts": summary.get("rollouts")}


def progress(run: Path, label: str):
    def show(elapsed: float) -> None:
        last = committed(run)
        try:
            figures = read_figures(run)
            rollouts = figures.rollouts
        except (sqlite3.Error, FileNotFoundError, TypeError):
            rollouts = 0
        log(f"{label}: {elapsed / 60:5.1f} min, version {last[0] if last else 0}, {rollouts} training rollouts")
    return show


def curve(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run, up_log = out / "run", out / "up.log"
    marks = [float(m) for m in args.marks.split(",")]
    versions: dict[float, int] = {}
    if not (out / "done").is_file():
        log(f"arborl up for {args.minutes:g} min in {run} (log {up_log})")
        started_at = time.time()
        up = start_up(run, {}, up_log)

        def mark(minutes: float):
            def take() -> None:
                target = out / f"weights-{minutes:g}min"
                if not target.exists():
                    versions[minutes] = snapshot(run, target)
                    log(f"{minutes:g} min: kept version {versions[minutes]} in {target}")
            return take

        try:
            run_for(up, args.minutes * 60, {m * 60: mark(m) for m in marks}, progress(run, "up"))
        finally:
            stop_up(up)
        (out / "done").write_text(json.dumps({"started_at": started_at, "stopped_at": time.time(),
                                              "versions": versions}))
    state = json.loads((out / "done").read_text())
    versions = {float(k): v for k, v in state["versions"].items()}
    figures = read_figures(run, start=state["started_at"], end=state["stopped_at"])

    from arborl.gateway.engines.model_source import DEFAULT_MODEL

    points = [(0.0, DEFAULT_MODEL, 0)] + [(m, str(out / f"weights-{m:g}min"), versions.get(m, 0)) for m in marks]
    rows = []
    for minutes, model, version in points:
        log(f"held-out evaluation after {minutes:g} min (version {version})")
        result = heldout_eval(model, out / f"heldout-{minutes:g}min", args.k, out / "eval.log")
        rows.append({"minutes": minutes, "version": version, **result})
    print(f"\n`arborl up` learning curve: held-out pass@1 (builtin agent, {args.k} rollouts per held-out task)")
    print(f"{'minutes':>8} {'version':>8} {'pass@1':>8} {'95% interval':>16}")
    for row in rows:
        p = row["pass_at_1"]
        interval = f"[{100 * p['low']:.0f}%, {100 * p['high']:.0f}%]"
        print(f"{row['minutes']:>8g} {row['version']:>8} {100 * p['value']:>7.1f}% {interval:>16}")
    latency = figures.latency_median_s
    print(f"\nrollouts per hour {figures.rollouts_per_hour:.0f}; "
          f"learner busy {100 * figures.learner_busy_fraction:.0f}%;"
          f" {figures.steps} steps; reward-to-served latency median "
          f"{'-' if latency is None else f'{latency:.0f} s'} over {len(figures.latencies_s)} steps")
    chart = line_chart([Series("held-out pass@1", [(r["minutes"], r["pass_at_1"]["value"]) for r in rows]),
                        Series("95% low", [(r["minutes"], r["pass_at_1"]["low"]) for r in rows], "#bbbbbb"),
                        Series("95% high", [(r["minutes"], r["pass_at_1"]["high"]) for r in rows], "#bbbbbb")],
                       x_label="minutes of arborl up (2 CPU cores)", y_label="held-out pass@1", percent=True)
    Path(args.chart).write_text(chart if chart.startswith("<svg") else "<svg xmlns='http://www.w3.org/2000/svg'/>")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "up_curve.json").write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "minutes": args.minutes, "k": args.k,
        "points": rows, "rollouts_per_hour": figures.rollouts_per_hour,
        "learner_busy_fraction": figures.learner_busy_fraction, "steps": figures.steps,
        "reward_to_served_s": figures.latencies_s}, indent=2))


def sync(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = {"async": {}, "sync": {"rollout": {"synchronous": True}, "learner": {"max_staleness": 0}}}
    rows = {}
    for name, config in modes.items():
        run = out / name
        if run.exists():
            shutil.rmtree(run)
        log(f"{name}: arborl up for {args.minutes:g} min in {run}")
        up = start_up(run, config, out / f"{name}.log")
        try:
            run_for(up, args.minutes * 60, {}, progress(run, name))
        finally:
            stop_up(up)
        figures = read_figures(run)  # from its first rollout: the model's start-up is not counted
        rows[name] = {"rollouts": figures.rollouts, "hours": figures.hours,
                      "rollouts_per_hour": figures.rollouts_per_hour,
                      "steps": figures.steps, "learner_busy_fraction": figures.learner_busy_fraction,
                      "reward_to_served_median_s": figures.latency_median_s}
    print(f"\n`arborl up`, {args.minutes:g} min each, same configuration")
    print(f"{'mode':>6} {'rollouts':>9} {'per hour':>9} {'steps':>6} {'learner busy':>13} {'reward→served':>14}")
    for name, row in rows.items():
        latency = row["reward_to_served_median_s"]
        print(f"{name:>6} {row['rollouts']:>9} {row['rollouts_per_hour']:>9.0f} {row['steps']:>6} "
              f"{100 * row['learner_busy_fraction']:>12.0f}% {'-' if latency is None else f'{latency:.0f} s':>14}")
    ratio = rows["async"]["rollouts_per_hour"] / max(rows["sync"]["rollouts_per_hour"], 1e-9)
    print(f"asynchronous / synchronous rollouts per hour: {ratio:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "up_sync.json").write_text(json.dumps({"minutes": args.minutes, "modes": rows, "ratio": ratio},
                                                     indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("curve")
    c.add_argument("--minutes", type=float, default=60)
    c.add_argument("--marks", default="30,60")
    c.add_argument("--k", type=int, default=2)
    c.add_argument("--out", default="runs/bench-up-curve")
    c.add_argument("--chart", default=str(ROOT / "docs" / "learning_curve.svg"))
    s = commands.add_parser("sync")
    s.add_argument("--minutes", type=float, default=10)
    s.add_argument("--out", default="runs/bench-up-sync")
    args = parser.parse_args()
    curve(args) if args.command == "curve" else sync(args)


if __name__ == "__main__":
    main()
