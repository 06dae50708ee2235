"""Weight swap of the default model into the embedded engine, while it decodes.

A learner's checkpoint (``save_pretrained``, safetensors) is published into a running
``EmbeddedEngine`` (SmolLM2-135M-Instruct on the CPU) while 4 requests stream tokens. Measured in
the same run:

- publish-to-served: from ``load_weights(FromPath(path, version))`` to the new version serving (reading
  the checkpoint off the event loop, then the in-place copy between two decode steps);
- serving pause: the longest gap between two tokens of a stream around the swap, against the
  median gap of the same streams (the baseline).

    .venv/bin/python tests/bench/bench_weight_swap.py      # writes tests/bench/results/weight_swap.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from arborl.gateway.engines.base import FromPath, SampledToken, SamplingParams
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model

HERE = Path(__file__).resolve().parent


async def _stream(engine: EmbeddedEngine, seed: int, tokens: int) -> list[tuple[float, int]]:
    """(arrival time, version) of every token of one request."""
    arrivals = []
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True)
    async for event in engine.generate(list(range(100, 140)), params):
        if isinstance(event, SampledToken):
            arrivals.append((time.perf_counter(), event.version))
    return arrivals


async def measure(model_dir: Path, checkpoint: Path, tokens: int, rounds: int) -> dict:
    engine = EmbeddedEngine(model_dir, device="cpu")
    await engine.start()
    results = []
    try:
        for version in range(1, rounds + 1):
            streams = [asyncio.create_task(_stream(engine, seed, tokens)) for seed in range(4)]
            await asyncio.sleep(0.5 + 0.2 * version)  # the streams are under way
            started = time.perf_counter()
            await engine.load_weights(FromPath(checkpoint, version))
            served = time.perf_counter()
            arrivals = await asyncio.gather(*streams)
            gaps, pauses = [], []
            for stream in arrivals:
                times = [t for t, _ in stream]
                steps = list(itertools.pairwise(times))
                gaps += [b - a for a, b in steps]
                pauses += [b - a for a, b in steps if a <= served and b >= started]
                versions = [v for _, v in stream]
                assert versions == sorted(versions) and versions[-1] == version, versions
            results.append({"publish_to_served_s": served - started, "median_gap_s": statistics.median(gaps),
                            "pause_s": max(pauses) if pauses else 0.0})
            print(f"swap {version}/{rounds}: publish-to-served {served - started:.3f} s, longest gap "
                  f"{results[-1]['pause_s']:.3f} s", file=sys.stderr, flush=True)
    finally:
        await engine.shutdown()
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="swaps (median reported)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(DEFAULT_MODEL)
    print(f"preparing a checkpoint of {model_dir.name} ...", file=sys.stderr, flush=True)
    learner = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.mul_(1.001)
    with tempfile.TemporaryDirectory() as folder:
        learner.save_pretrained(folder, safe_serialization=True)
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        result = asyncio.run(measure(model_dir, Path(folder), args.tokens, args.rounds))
    result["checkpoint_mib"] = size / 2**20
    print("\n| figure | value |\n| --- | --- |")
    print(f"| checkpoint | {result['checkpoint_mib']:.0f} MiB safetensors |")
    print(f"| publish-to-served (read + swap between steps) | {result['publish_to_served_s']:.3f} s |")
    print(f"| longest token gap across the swap | {result['pause_s']:.3f} s |")
    print(f"| median token gap (baseline, same streams) | {result['median_gap_s']:.3f} s |")
    print(f"| serving pause / median gap | {result['pause_s'] / result['median_gap_s']:.1f}x |")
    out = HERE / "results" / "weight_swap.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
