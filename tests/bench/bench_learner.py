"""Learner throughput on the CPU: the default model, one training step over an agent-shaped trie.

One group of 4 rollouts shares a 512-token prompt; each has 3 turns of 64 completion and 96
tool-output tokens. ``train_step`` (turn-level GSPO, packed micro-batch, tree attention, fused
logprob) runs with MCLA K = 1 and K = 8 in the same run; tokens/s counts the packed tokens of
the training forward. K = 8 costs 7 extra no-grad forwards, reported as the ratio.

    .venv/bin/python tests/bench/bench_learner.py      # writes tests/bench/results/learner.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
from arborl.learner.packing import CallSpan
from arborl.learner.train_step import RolloutSample, StepConfig, train_step
from arborl.rollout.trie import Trie

HERE = Path(__file__).resolve().parent


def agent_group(vocab: int, *, rollouts: int = 4, prompt: int = 512, turns: int = 3, completion: int = 64,
                tool_output: int = 96) -> list[RolloutSample]:
    rng = random.Random(0)
    shared = [rng.randrange(vocab) for _ in range(prompt)]
    samples = []
    for r in range(rollouts):
        trie, calls, context = Trie(), [], list(shared)
        for turn in range(turns):
            reply = [rng.randrange(vocab) for _ in range(completion)]
            calls.append(CallSpan((r, turn), trie.insert(context + reply).leaf, completion))
            context += reply + [rng.randrange(vocab) for _ in range(tool_output)]
        samples.append(RolloutSample(trie, calls, reward=float(r % 2), group=0))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per setting (median reported)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    group = agent_group(model.config.vocab_size)
    results = {}
    for passes in (1, 8):
        config = StepConfig(mcla_passes=passes, token_budget=4096)
        train_step(model, optimizer, group, config)  # warm-up
        times, tokens = [], 0.0
        for step in range(args.steps):
            started = time.perf_counter()
            tokens = train_step(model, optimizer, group, config)["tokens"]
            times.append(time.perf_counter() - started)
            print(f"K={passes} step {step + 1}/{args.steps}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
        seconds = statistics.median(times)
        results[f"K={passes}"] = {"step_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    slowdown = results["K=8"]["step_s"] / results["K=1"]["step_s"]
    print("\n| MCLA passes | step time | packed tokens | tokens/s |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.2f} s | {r['tokens']:.0f} | {r['tokens_per_s']:.0f} |")
    print(f"\nK = 8 step time / K = 1 step time: {slowdown:.2f}x")
    results["k8_over_k1"] = slowdown
    out = HERE / "results" / "learner.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
