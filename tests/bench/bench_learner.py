"""Learner throughput on the CPU: the default model, one training step over an agent-shaped trie.

One group of 4 rollouts shares a 512-token prompt in one trie (as ``learner.group_data`` builds
it); each rollout has 3 turns of 64 completion and 96 tool-output tokens. ``train_step``
(turn-level GSPO, packed micro-batch, tree attention, fused logprob) runs in the same run,
interleaved step by step, as:

- ``K=1``: what the learner does with one MCLA pass. The forward is deterministic, so logp_old is
  the training forward's own logp and there is no separate old pass; the LM head is applied at
  the completion tokens only.
- ``K=1, old pass``: the same with the no-grad old pass forced (the learner before it reused the
  training forward);
- ``K=1, old pass, head everywhere``: also the LM head applied at every packed token and the
  completions picked afterwards (the learner before it scored only completions);
- ``K=8``: MCLA, 8 no-grad passes before the training pass.

The baselines are emulated by wrapping the learner's own functions for the duration of a step.
tokens/s counts the packed tokens of the training forward.

    .venv/bin/python tests/bench/bench_learner.py      # writes tests/bench/results/learner.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch

from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
from arborl.learner import train_step as train_step_module
from arborl.learner import tree_forward
from arborl.learner.backends import torch_backend
from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.packing import CallSpan
from arborl.learner.train_step import RolloutSample, StepConfig, train_step
from arborl.rollout.trie import Trie

HERE = Path(__file__).resolve().parent


def agent_group(vocab: int, *, rollouts: int = 4, prompt: int = 512, turns: int = 3, completion: int = 64,
                tool_output: int = 96) -> list[RolloutSample]:
    rng = random.Random(0)
    shared = [rng.randrange(vocab) for _ in range(prompt)]
    samples, trie = [], Trie()
    for r in range(rollouts):
        calls, context = [], list(shared)
        for turn in range(turns):
            reply = [rng.randrange(vocab) for _ in range(completion)]
            calls.append(CallSpan((r, turn), trie.insert(context + reply).leaf, completion))
            context += reply + [rng.randrange(vocab) for _ in range(tool_output)]
        samples.append(RolloutSample(trie, calls, reward=float(r % 2), group=0))
    return samples


def _head_everywhere(original):
    def score(model, batch, *, attention, at=None, **kwargs):
        logp, entropy = original(model, batch, attention=attention, **kwargs)
        return (logp, entropy) if at is None else (logp[at], entropy[at])

    return score


@contextmanager
def baseline(*, old_pass: bool, head_everywhere: bool = False):
    with ExitStack() as stack:
        if old_pass:
            stack.enter_context(patch.object(train_step_module, "old_pass_needed", lambda backend, config: True))
        if head_everywhere:
            score = _head_everywhere(tree_forward.packed_logprobs_and_entropy)
            for module in (tree_forward, torch_backend):
                stack.enter_context(patch.object(module, "packed_logprobs_and_entropy", score))
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per setting (median reported)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    group = agent_group(model.config.vocab_size)
    settings = {
        "K=1": (1, nullcontext),
        "K=1, old pass": (1, partial(baseline, old_pass=True)),
        "K=1, old pass, head everywhere": (1, partial(baseline, old_pass=True, head_everywhere=True)),
        "K=8": (8, nullcontext),
    }
    # Interleaved, one step of each setting per round, so a slow spell of the machine hits all of them.
    times: dict[str, list[float]] = {name: [] for name in settings}
    metrics: dict[str, dict[str, float]] = {}
    for round_ in range(args.steps + 1):  # round 0 warms each setting up
        for name, (passes, scoring) in settings.items():
            with scoring():
                started = time.perf_counter()
                metrics[name] = train_step(TorchBackend(model, optimizer), group,
                                           StepConfig(mcla_passes=passes, token_budget=4096))
                seconds = time.perf_counter() - started
            if round_:
                times[name].append(seconds)
                print(f"{name} step {round_}/{args.steps}: {seconds:.2f} s", file=sys.stderr, flush=True)
    results = {}
    for name in settings:
        seconds = statistics.median(times[name])
        results[name] = {"step_s": seconds, "tokens": metrics[name]["tokens"],
                         "completion_tokens": metrics[name]["completion_tokens"],
                         "tokens_per_s": metrics[name]["tokens"] / seconds}
    print("\n| setting | step time | packed tokens | completion tokens | tokens/s |\n| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.2f} s | {r['tokens']:.0f} | {r['completion_tokens']:.0f} | "
              f"{r['tokens_per_s']:.0f} |")
    k1 = results["K=1"]["step_s"]
    ratios = {
        "K=1, old pass / K=1": results["K=1, old pass"]["step_s"] / k1,
        "K=1, old pass, head everywhere / K=1": results["K=1, old pass, head everywhere"]["step_s"] / k1,
        "K=8 / K=1": results["K=8"]["step_s"] / k1,
    }
    print()
    for name, ratio in ratios.items():
        print(f"step time {name}: {ratio:.2f}x")
    results["ratios"] = ratios
    out = HERE / "results" / "learner.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
