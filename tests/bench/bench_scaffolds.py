"""The scaffold compatibility table: every installed agent CLI on the same task, as rollouts.

Each scaffold runs the hello-file task of the e2e rollout tests (``tests/e2e/test_cli_rollouts.py``)
``--rollouts`` times in the ``local`` sandbox, through one gateway whose policy is a script in the
scaffold's own tool vocabulary (the e2e tests' scripts: a real tool call, then an answer). From
the store it counts, per scaffold: rollouts graded 1, model calls per rollout, prefix breaks per
100 main calls by reason (a main call that does not extend the session's earlier path), and
auxiliary calls (titles, side calls, sub-agents) per session. A CLI that is not installed is listed
as such. Prints a markdown table and writes ``results/scaffolds.json``.

    python tests/bench/bench_scaffolds.py [--rollouts N] [--only a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "e2e")]

import test_cli_rollouts as rollouts  # noqa: E402  (the e2e tests' scripts and task)
import test_cline  # noqa: E402
import test_codex  # noqa: E402

from agent_cli import scripted_gateway  # noqa: E402
from arborl.gateway.engines.model_source import TINY_MODEL, resolve_model  # noqa: E402
from arborl.rollout.orchestrator import Orchestrator, eval_plans  # noqa: E402
from arborl.rollout.settings import RolloutSettings  # noqa: E402
from arborl.rollout.store import RunLedger  # noqa: E402
from arborl.scaffold_adapters.registry import get_adapter  # noqa: E402

# scaffold -> its policy script; builtin runs in-process and is not a CLI.
SCRIPTS = {
    "claude-code": rollouts.claude_writes_hello,
    "codex": test_codex.write_then_cat,
    "opencode": rollouts.opencode_family_writes_hello,
    "kilocode": rollouts.opencode_family_writes_hello,
    "cline": test_cline.write_then_cat,
    "mini-swe-agent": rollouts.mini_writes_hello,
    "gemini-cli": rollouts.gemini_family_writes_hello,
    "qwen-code": rollouts.gemini_family_writes_hello,
    "aider": rollouts.aider_writes_hello,
    "openclaw": rollouts.openclaw_writes_hello,
}


def run_scaffold(scaffold: str, n: int, root: Path) -> dict:
    adapter = get_adapter(scaffold)
    row = {"scaffold": scaffold, "version": adapter.tested_version, "dialect": adapter.dialect,
           "command": " ".join(adapter.command("TASK"))}
    if shutil.which(adapter.executable) is None:
        return {**row, "installed": False}
    with scripted_gateway(resolve_model(TINY_MODEL), root, SCRIPTS[scaffold]) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox="local", agent_timeout_s=120))
        started = time.perf_counter()
        results = orchestrator.run(eval_plans([rollouts.TASK], [scaffold], n))
        seconds = time.perf_counter() - started
        store = gateway.store
        main_calls, aux_calls, breaks = 0, 0, Counter()
        sessions = {s["id"] for s in store.sessions()}
        for result in results:
            for session in (s for s in sessions if s == result.session_id or s.startswith(result.session_id + ":")):
                for call in store.calls(session):
                    if call.purpose in ("main", "subagent") and session == result.session_id:
                        main_calls += 1
                        if call.branch_reason:
                            breaks[call.branch_reason] += 1
                    else:
                        aux_calls += 1
        store.close()
    return {**row, "installed": True, "rollouts": n, "solved": sum(r.reward == 1.0 for r in results),
            "main_calls": main_calls, "calls_per_rollout": main_calls / n,
            "breaks_per_100_calls": {reason: 100 * count / max(main_calls, 1) for reason, count in breaks.items()},
            "aux_calls_per_session": aux_calls / n, "seconds_per_rollout": seconds / n}


def _breaks(row: dict) -> str:
    breaks = row["breaks_per_100_calls"]
    return ", ".join(f"{value:.0f} {reason}" for reason, value in sorted(breaks.items())) or "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=3, help="rollouts per scaffold (default 3)")
    parser.add_argument("--only", default="", help="comma-separated scaffolds (default: all)")
    args = parser.parse_args()
    names = [name for name in SCRIPTS if not args.only or name in args.only.split(",")]
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        root = Path(tempfile.mkdtemp(prefix=f"arborl-compat-{name}-"))
        os.chmod(root, 0o711)  # the local sandbox's uids must reach the workspaces inside
        rows.append(run_scaffold(name, args.rollouts, root))
    print(f"\n### Scaffolds on the hello-file task ({args.rollouts} rollouts each, scripted policy, local sandbox)\n")
    print("| scaffold | version | dialect | solved | calls per rollout | prefix breaks per 100 calls | "
          "auxiliary calls per session | s per rollout |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if not row["installed"]:
            print(f"| {row['scaffold']} | {row['version']} | {row['dialect']} | not installed | | | | |")
            continue
        print(f"| {row['scaffold']} | {row['version']} | {row['dialect']} | {row['solved']}/{row['rollouts']} | "
              f"{row['calls_per_rollout']:.1f} | {_breaks(row)} | {row['aux_calls_per_session']:.1f} | "
              f"{row['seconds_per_rollout']:.1f} |")
    out = HERE / "results" / "scaffolds.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwritten {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
