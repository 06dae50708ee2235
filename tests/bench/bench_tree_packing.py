"""Tree packing versus per-call and per-rollout linearisation: one training step on agent-shaped tries.

The group (the issue's shape, all lengths times ``--scale``): 8 rollouts of one task share a
4,000-token prompt; each runs 10 turns of about 300 completion tokens followed by 500 tokens of tool
output; rollout 0 compacts its context after turn 6 (a summary call, then the remaining turns
continue from prompt + summary: a branch off the shared prompt). Every call is a training call.

The same ``train_step`` (old pass, forward with grad, backward, AdamW; turn-level GSPO) runs with
the default model on the three layouts of ``learner.train_step.plan_micro_batches``:

- ``tree``: the group's trie, split into micro-batches of whole subtrees under the token budget;
- ``per_rollout``: one sequence per rollout (its own branches packed with it);
- ``per_call``: every call its own sequence, prompt included.

Per-call costs about ten times the others, so by default it is timed on rollouts 0 (the compacted
one) and 1 and extrapolated as t0 + 7 t1 (the other rollouts have rollout 1's shape);
``--per-call-full`` times all eight. Tokens are always counted in full. The table reports each
layout's tokens and step time and, against each baseline, the token-count reduction, the
step-time speed-up and their ratio (the issue asks for at least 0.8).

On two CPU cores the full shape is hours per layout; the README's figures use ``--scale 0.125``.
The micro-batch budget matters on the CPU: at 8,192 tokens the group is one micro-batch (the
prompt computed once) but elementwise ops cost 3.5x more per token out of cache, so 2,048 wins.

    # writes tests/bench/results/tree_packing.json
    .venv/bin/python tests/bench/bench_tree_packing.py --scale 0.125 --budget 2048
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
from arborl.kernels.tree_attention import BLOCKS
from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.packing import CallSpan
from arborl.learner.train_step import RolloutSample, StepConfig, plan_micro_batches, train_step
from arborl.rollout.trie import Trie

HERE = Path(__file__).resolve().parent


def agent_group(
    vocab: int, scale: float, *, rollouts: int = 8, turns: int = 10, compact_after: int = 6
) -> list[RolloutSample]:
    """One group's rollouts in one shared trie (what ``learner.group_data`` builds from the store)."""
    rng = random.Random(0)
    size = {name: max(1, round(n * scale)) for name, n in
            {"prompt": 4000, "completion": 300, "tool": 500, "summary": 400, "ask": 40}.items()}

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    trie, prompt, samples = Trie(), tokens(size["prompt"]), []

    def call(prefix: list[int], completion: list[int], key) -> CallSpan:
        return CallSpan(key, trie.insert(prefix + completion).leaf, len(completion))

    for r in range(rollouts):
        calls, context = [], list(prompt)
        for turn in range(turns):
            if r == 0 and turn == compact_after:
                summary = tokens(size["summary"])
                calls.append(call(context + tokens(size["ask"]), summary, (r, "compaction")))
                context = prompt + summary  # the branch: the conversation restarts from the summary
            reply = tokens(size["completion"])
            calls.append(call(context, reply, (r, turn)))
            context = context + reply + tokens(size["tool"])
        samples.append(RolloutSample(trie, calls, reward=float(r % 2), group=0))
    return samples


def _time_step(model, optimizer, rollouts, config: StepConfig) -> tuple[float, int]:
    started = time.perf_counter()
    metrics = train_step(TorchBackend(model, optimizer), rollouts, config)
    return time.perf_counter() - started, int(metrics["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.125,
                        help="multiply every length of the shape (1 = the issue's)")
    parser.add_argument("--budget", type=int, default=2048, help="tokens per micro-batch")
    parser.add_argument("--attention", default=BLOCKS, help="tree attention implementation")
    parser.add_argument("--per-call-full", action="store_true", help="time per-call on all rollouts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(DEFAULT_MODEL), dtype=torch.float32).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    group = agent_group(model.config.vocab_size, args.scale)
    config = {layout: StepConfig(layout=layout, token_budget=args.budget, attention=args.attention)
              for layout in ("tree", "per_rollout", "per_call")}
    tokens = {layout: sum(m.batch.num_tokens for m in plan_micro_batches(group, args.budget, layout))
              for layout in config}
    print(f"default model on {args.device}, scale {args.scale}, budget {args.budget}: trie "
          f"{group[0].trie.num_tokens} tokens, {sum(len(r.calls) for r in group)} calls", file=sys.stderr)

    # Warm each layout up on its own shapes first: the first step at a new size pays the first
    # touch of its memory (an 8k-token tree step: about 77 s, then 62-72 s).
    for layout in ("tree", "per_rollout"):
        train_step(TorchBackend(model, optimizer), group, config[layout])
        print(f"{layout}: warmed up", file=sys.stderr, flush=True)
    train_step(TorchBackend(model, optimizer), group[1:2], config["per_call"])
    seconds = {}
    for layout in ("tree", "per_rollout"):
        seconds[layout], counted = _time_step(model, optimizer, group, config[layout])
        assert counted == tokens[layout]
        print(f"{layout}: {seconds[layout]:.1f} s for {counted} tokens", file=sys.stderr, flush=True)
    if args.per_call_full:
        seconds["per_call"], _ = _time_step(model, optimizer, group, config["per_call"])
        how = "measured on all rollouts"
    else:
        t0, n0 = _time_step(model, optimizer, group[:1], config["per_call"])
        t1, n1 = _time_step(model, optimizer, group[1:2], config["per_call"])
        assert n0 + (len(group) - 1) * n1 == tokens["per_call"]
        seconds["per_call"] = t0 + (len(group) - 1) * t1
        how = f"rollout 0 ({t0:.1f} s) + {len(group) - 1} x rollout 1 ({t1:.1f} s)"
    print(f"per_call: {seconds['per_call']:.1f} s ({how})", file=sys.stderr, flush=True)

    print("\n| layout | tokens computed | step time | tokens/s |\n| --- | --- | --- | --- |")
    for layout in config:
        print(f"| {layout} | {tokens[layout]} | {seconds[layout]:.1f} s | {tokens[layout] / seconds[layout]:.0f} |")
    print("\n| tree packing vs | token reduction | step-time speed-up | speed-up / reduction |")
    print("| --- | --- | --- | --- |")
    results: dict = {"scale": args.scale, "budget": args.budget, "attention": args.attention, "device": args.device,
                     "per_call_timing": how, "tokens": tokens, "seconds": seconds, "vs": {}}
    for baseline in ("per_rollout", "per_call"):
        reduction = tokens[baseline] / tokens["tree"]
        speedup = seconds[baseline] / seconds["tree"]
        results["vs"][baseline] = {"token_reduction": reduction, "speedup": speedup, "ratio": speedup / reduction}
        print(f"| {baseline} | {reduction:.2f}x | {speedup:.2f}x | {speedup / reduction:.2f} |")
    out = HERE / "results" / "tree_packing.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
