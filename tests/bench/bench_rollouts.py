"""Rollout throughput: rollouts per minute with the builtin agent and the default model, at
several concurrencies, and where each rollout's time goes.

One gateway with the embedded engine (the default model, on this machine's CPU) serves every
rollout; the orchestrator runs the same HumanEval tasks at each concurrency (``--concurrency
1,2,4``), each concurrency with its own groups. Per rollout the orchestrator records:

  model     the gateway's time for the rollout's calls (queueing included)
  tools     the agent's own commands in the sandbox
  verify    killing the agent, installing the hidden tests, running them
  overhead  everything else: sandbox set-up and teardown, the workspace, the ledger, the agent's
            bookkeeping between calls (``Timings.overhead_s``)

Rollouts per minute are compared with concurrency 1 in the same run (a ratio). A second,
model-free pass runs the ``nop`` scaffold on the same tasks: its time per rollout is the fixed
cost of a rollout without any agent (sandbox, workspace, verification, ledger), and its
overhead column is the orchestrator's own share.

    .venv/bin/python tests/bench/bench_rollouts.py            # writes tests/bench/results/rollouts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from arborl.gateway.engines.model_source import DEFAULT_MODEL
from arborl.ops.config import ArborlConfig, EngineConfig
from arborl.ops.local_gateway import start_local_gateway
from arborl.rollout.orchestrator import Orchestrator, eval_plans
from arborl.rollout.results import RolloutResult
from arborl.rollout.settings import RolloutSettings
from arborl.rollout.store import RunLedger
from arborl.rollout.task_loaders import load_dataset

HERE = Path(__file__).resolve().parent
PHASES = ("model_s", "tools_s", "verify_s", "overhead_s")


def _phase(result: RolloutResult, name: str) -> float:
    return getattr(result.timings, name)


def _row(label: str, results: list[RolloutResult], wall_s: float) -> dict:
    done = [r for r in results if r.status == "done"]
    per = {name: statistics.mean(_phase(r, name) for r in done) if done else 0.0 for name in PHASES}
    return {
        "label": label,
        "rollouts": len(done),
        "infra_failed": len(results) - len(done),
        "wall_s": wall_s,
        "rollouts_per_min": 60 * len(done) / wall_s if wall_s else 0.0,
        "mean_s": statistics.mean(r.timings.total_s for r in done) if done else 0.0,
        "turns": statistics.mean(r.turns for r in done) if done else 0.0,
        "completion_tokens": sum(r.completion_tokens for r in done),
        "solved": sum(r.solved for r in done),
        **per,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="HumanEval tasks per concurrency")
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--sandbox", default="local", choices=["local", "bwrap"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rollouts.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="arborl-bench-rollouts-"))
    root.chmod(0o711)  # a local sandbox's uid must be able to reach its workspace
    tasks = load_dataset("humaneval")[: args.tasks]
    config = ArborlConfig(run_dir=root / "run", engine=EngineConfig(model=args.model, max_running=8))
    gateway = start_local_gateway(config, config.run_dir)
    rows = []
    try:
        ledger = RunLedger(gateway.store)
        for concurrency in [int(c) for c in args.concurrency.split(",")] + [0]:
            scaffold = "builtin" if concurrency else "nop"
            settings = RolloutSettings(concurrency=max(concurrency, 1), max_turns=args.max_turns,
                                       max_tokens=args.max_tokens, sandbox=args.sandbox, agent_timeout_s=300)
            orchestrator = Orchestrator(ledger, config.run_dir, gateway.url, gateway.engine.model_name,
                                        settings=settings)
            label = f"builtin c={concurrency}" if concurrency else "nop c=1"
            print(f"{label}: {len(tasks)} rollouts ...", flush=True)
            started = time.monotonic()
            results = orchestrator.run(eval_plans(tasks, [scaffold], 1, prefix=label))
            rows.append(_row(label, results, time.monotonic() - started))
            print(f"  {rows[-1]['rollouts_per_min']:.2f} rollouts/min", flush=True)
    finally:
        gateway.stop()
        gateway.store.close()
        shutil.rmtree(root, ignore_errors=True)

    base = rows[0]["rollouts_per_min"] or 1.0
    print(f"\n{args.tasks} HumanEval tasks, builtin agent, {args.model}, {args.sandbox} sandbox, "
          f"max {args.max_turns} turns x {args.max_tokens} tokens")
    header = (f"{'run':<14}{'rollouts/min':>13}{'vs c=1':>8}{'s/rollout':>10}{'turns':>7}"
              + "".join(f"{name[:-2]:>10}" for name in PHASES) + f"{'solved':>8}")
    print(header)
    for row in rows:
        print(f"{row['label']:<14}{row['rollouts_per_min']:>13.2f}{row['rollouts_per_min'] / base:>7.2f}x"
              f"{row['mean_s']:>10.2f}{row['turns']:>7.1f}" + "".join(f"{row[name]:>10.3f}" for name in PHASES)
              + f"{row['solved']:>5}/{row['rollouts']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
