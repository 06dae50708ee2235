"""Sandbox start-up overhead: from "create a sandbox" to its first command's completion.

Each iteration times, in turn (interleaved, so drift in the machine's load hits all alike):

  bare   ``subprocess.run(["true"])``: the baseline, no sandbox at all
  local  ``make_sandbox("local", ...)`` then ``sandbox.run("true")``
  bwrap  ``make_sandbox("bwrap", ...)`` then ``sandbox.run("true")``

and, apart, a second ``run("true")`` in the same sandbox (what every later command costs) and
each sandbox's ``close()`` (a /proc scan for leftovers, removing the scratch folder).
A sandbox's first command pays for what every later one pays (``bash -c`` through setpriv,
prlimit and, for bwrap, the namespaces and mounts) plus the creation of the scratch folder, the
uid lease and the watchdog thread. The table reports medians and 90th percentiles over
``--iterations`` and the median as a multiple of the bare baseline.

    .venv/bin/python tests/bench/bench_sandbox.py      # writes tests/bench/results/sandbox.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arborl.rollout.sandboxes import Limits, bwrap_unavailable_reason, make_sandbox

HERE = Path(__file__).resolve().parent
LIMITS = Limits(wall_s=60, command_s=30)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()

    kinds = ["local"]
    missing = bwrap_unavailable_reason()
    if missing is None:
        kinds.append("bwrap")
    else:
        print(f"bwrap skipped: {missing}", file=sys.stderr)

    root = Path(tempfile.mkdtemp(prefix="arborl-bench-sandbox-"))
    root.chmod(0o755)  # a local sandbox's uid must be able to reach its workspace
    start: dict[str, list[float]] = {"bare": [], **{kind: [] for kind in kinds}}
    close: dict[str, list[float]] = {kind: [] for kind in kinds}
    again: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for iteration in range(args.iterations + 1):  # the first round warms caches and probes
            started = time.perf_counter()
            subprocess.run(["true"], check=True)
            bare = time.perf_counter() - started
            rows = {"bare": bare}
            for kind in kinds:
                started = time.perf_counter()
                sandbox = make_sandbox(kind, root, name="bench", limits=LIMITS)
                result = sandbox.run("true")
                rows[kind] = time.perf_counter() - started
                assert result.ok, result
                started = time.perf_counter()
                sandbox.run("true")
                if iteration:
                    again[kind].append(time.perf_counter() - started)
                started = time.perf_counter()
                sandbox.close()
                if iteration:
                    close[kind].append(time.perf_counter() - started)
            if iteration:
                for name, seconds in rows.items():
                    start[name].append(seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = statistics.median(start["bare"])
    results: dict = {
        "iterations": args.iterations,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "uid": os.geteuid(),
                    "python": platform.python_version()},
        "bwrap": "available" if missing is None else missing,
        "baseline": "subprocess.run(['true'])",
        "start_to_first_command": {},
        "later_command": {},
        "close": {},
    }
    print(f"\nstart to first command (`true`), median of {args.iterations} interleaved runs, uid {os.geteuid()}\n")
    print("| target | median | p90 | vs bare | later command (median) | close (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in start.items():
        median, p90 = statistics.median(values), _percentile(values, 0.9)
        results["start_to_first_command"][name] = {"median_s": median, "p90_s": p90, "ratio_to_bare": median / base}
        later = closed = "-"
        if name in close:
            results["later_command"][name] = {"median_s": statistics.median(again[name]),
                                              "ratio_to_bare": statistics.median(again[name]) / base}
            results["close"][name] = {"median_s": statistics.median(close[name])}
            later = f"{statistics.median(again[name]) * 1000:.1f} ms ({statistics.median(again[name]) / base:.1f}x)"
            closed = f"{statistics.median(close[name]) * 1000:.1f} ms"
        print(f"| {name} | {median * 1000:.1f} ms | {p90 * 1000:.1f} ms | {median / base:.1f}x | {later} | {closed} |")
    out = HERE / "results" / "sandbox.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
