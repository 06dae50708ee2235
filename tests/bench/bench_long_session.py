"""Gateway overhead per call along one long session: turn 10, 100 and 300, before and after.

An agent resends the whole conversation on every call. The gateway used to read the session's
history back from the store on every call to stitch the next prompt, and to store every request
whole, so a call's cost grew with the turns before it. Now the session's turns are in memory and
calls are stored as deltas (issue 14). This bench drives one 300-turn session (a 12-word user
message per turn, 2 sampled tokens per reply, greedy) through a real gateway on loopback: the
embedded engine on the tiny random model (given a 32k context), recording into SQLite. It runs
the same session against the baseline code (``--baseline``, checked out into a git worktree in
the same run) and against the working tree, each in its own process.

Overhead of a call = its wall time at the client minus the engine's time for it (from the
gateway asking the engine for tokens to the engine's last event; measured by wrapping the
engine's ``generate``). Each figure is the median of the 5 turns ending at that turn. Stored
bytes per turn = what the session's rows grew by over those turns, per turn.

    python tests/bench/bench_long_session.py            # table to stdout, JSON to tests/bench/results/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BASELINE = "f979fba"  # the last commit before the in-memory session turns and the stored deltas
AT_TURNS = (10, 100, 300)
WINDOW = 5
WORDS = "read the file then run the tests and fix what fails in the parser module".split()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stored_bytes(store_path: Path, session: str) -> int:
    """The bytes of the session's rows (calls and trie nodes), read the same way for either layout."""
    with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True) as db:
        calls = db.execute(
            "SELECT COALESCE(SUM(LENGTH(messages) + LENGTH(COALESCE(response_message, '')) "
            "+ LENGTH(COALESCE(tools, '')) + LENGTH(request_body) + LENGTH(response_body) "
            "+ LENGTH(completion_logprobs) + LENGTH(completion_versions)), 0) FROM calls WHERE session_id = ?",
            (session,)).fetchone()[0]
        nodes = db.execute("SELECT COALESCE(SUM(LENGTH(tokens)), 0) FROM nodes WHERE session_id = ?",
                           (session,)).fetchone()[0]
    return calls + nodes


def worker(model_dir: Path, run_dir: Path, turns: int) -> None:
    """One session of ``turns`` calls against an in-process gateway; a JSON line per turn on stdout."""
    import httpx

    from arborl.gateway.app import create_app
    from arborl.gateway.engines.embedded import EmbeddedEngine
    from arborl.gateway.settings import GatewaySettings
    from arborl.ops.local_gateway import ServerThread
    try:
        from arborl.rollout.store import SqliteTrajectoryStore
    except ImportError:  # the baseline code, from before the store seam had two implementations
        from arborl.rollout.store import TrajectoryStore as SqliteTrajectoryStore

    class TimedEngine(EmbeddedEngine):
        engine_s = 0.0

        def generate(self, prompt_ids, params, *, cache_key=None):
            inner = super().generate(prompt_ids, params, cache_key=cache_key)

            async def timed():
                started = time.perf_counter()
                try:
                    async for event in inner:
                        yield event
                finally:
                    TimedEngine.engine_s += time.perf_counter() - started

            return timed()

    engine = TimedEngine(model_dir, model_name="tiny")
    store_path = run_dir / "store.sqlite"
    store = SqliteTrajectoryStore(store_path)
    settings = GatewaySettings()
    rng = random.Random(0)
    messages: list[dict] = [{"role": "system", "content": "You are a coding agent."}]
    with ServerThread(create_app(engine, store, settings), settings=settings) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        for turn in range(1, turns + 1):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=12))})
            raw = json.dumps({"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0})
            engine_before = TimedEngine.engine_s
            started = time.perf_counter()
            response = client.post("/s/long/v1/chat/completions", content=raw,
                                   headers={"content-type": "application/json"})
            wall = time.perf_counter() - started
            response.raise_for_status()
            messages.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
            engine_s = TimedEngine.engine_s - engine_before
            print(json.dumps({"turn": turn, "wall_s": wall, "engine_s": engine_s,
                              "bytes": _stored_bytes(store_path, "long")}), flush=True)
            if turn % 50 == 0:
                _log(f"  turn {turn}/{turns}: {1000 * (wall - engine_s):.1f} ms overhead")
    breaks = sum(1 for c in store.calls("long") if c.branch_reason)
    print(json.dumps({"breaks": breaks}), flush=True)
    store.close()


def _long_context_model(folder: Path) -> Path:
    from arborl.gateway.engines.model_source import TINY_MODEL, resolve_model

    shutil.copytree(resolve_model(TINY_MODEL), folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _run_side(name: str, package_root: Path, model_dir: Path, work: Path, turns: int) -> dict:
    """Run the worker with ``package_root`` (a folder holding ``arborl``) first on the import path."""
    _log(f"{name}: {turns} turns")
    run_dir = work / name
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model_dir),
                          "--run-dir", str(run_dir), "--turns", str(turns)],
                         env=env, capture_output=False, stdout=subprocess.PIPE, text=True, check=True, cwd=work)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    rows = {row["turn"]: row for row in lines if "turn" in row}
    breaks = next(row["breaks"] for row in lines if "breaks" in row)
    figures = {}
    for at in AT_TURNS:
        window = [rows[t] for t in range(at - WINDOW + 1, at + 1)]
        figures[at] = {
            "overhead_ms": 1000 * statistics.median(r["wall_s"] - r["engine_s"] for r in window),
            "engine_ms": 1000 * statistics.median(r["engine_s"] for r in window),
            "bytes_per_turn": (rows[at]["bytes"] - rows[at - WINDOW]["bytes"]) / WINDOW,
        }
    return {"figures": figures, "breaks": breaks}


def _package_root(code: Path, work: Path, name: str) -> Path:
    root = work / f"{name}-pkg"
    root.mkdir()
    (root / "arborl").symlink_to(code)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the code to compare with")
    parser.add_argument("--turns", type=int, default=max(AT_TURNS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.run_dir, args.turns)
        return

    work = Path(tempfile.mkdtemp(prefix="arborl-bench-long-"))
    baseline_tree = work / "baseline"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline_tree), args.baseline],
                       check=True, capture_output=True)
        model_dir = _long_context_model(work / "tiny-long")
        sides = {
            f"before ({args.baseline})": _run_side("before", _package_root(baseline_tree, work, "before"),
                                                   model_dir, work, args.turns),
            "after (working tree)": _run_side("after", _package_root(REPO, work, "after"), model_dir, work,
                                              args.turns),
        }
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline_tree)],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\none session, {args.turns} turns, embedded engine (tiny model), SQLite store; "
          f"median of the {WINDOW} turns ending at each turn")
    header = f"{'code':24} {'turn':>5} {'overhead ms':>12} {'engine ms':>10} {'bytes/turn':>11}"
    print(header + "\n" + "-" * len(header))
    for name, side in sides.items():
        for at in AT_TURNS:
            f = side["figures"][at]
            print(f"{name:24} {at:>5} {f['overhead_ms']:>12.2f} {f['engine_ms']:>10.2f} {f['bytes_per_turn']:>11.0f}")
    print()
    for name, side in sides.items():
        f = side["figures"]
        print(f"{name}: turn {AT_TURNS[-1]} overhead / turn {AT_TURNS[0]} overhead = "
              f"{f[AT_TURNS[-1]]['overhead_ms'] / f[AT_TURNS[0]]['overhead_ms']:.2f}x (goal for after: <= 1.2x); "
              f"stitching breaks: {side['breaks']}")
    before, after = (side["figures"][AT_TURNS[-1]] for side in sides.values())
    print(f"turn {AT_TURNS[-1]}: after is {before['overhead_ms'] / after['overhead_ms']:.1f}x faster, stores "
          f"{before['bytes_per_turn'] / after['bytes_per_turn']:.1f}x fewer bytes per turn")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "long_session.json").write_text(json.dumps(
        {"turns": args.turns, "baseline": args.baseline, "sides": sides}, indent=2))


if __name__ == "__main__":
    main()
