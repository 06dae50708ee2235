"""Training backends on this machine: the torch backend (1 process) against fsdp (2 gloo ranks) and
megatron (1 rank: the same packed micro-batches as torch; and 2 data-parallel gloo ranks: the
default model's 3 KV heads do not split over 2 tensor-parallel ranks).

The default model (SmolLM2-135M, float32), one turn-level GSPO step over the agent-shaped group
of ``bench_learner`` (4 rollouts sharing a 512-token prompt, 3 turns of 64 completion and 96
tool-output tokens each), token budget 1024 so the step has several micro-batches to spread.
Each backend runs in fresh processes of its own (spawned, so memory figures are its own): the
torch backend with every core, each fsdp rank with cores / ranks threads. Per rank: median step
seconds after a warm-up step, packed tokens per second, the parameter + gradient + AdamW state
it holds (FSDP keeps 1/N of each), and its peak RSS (every rank loads the whole model before
sharding, so the RSS peak is not where FSDP saves).

    .venv/bin/python tests/bench/bench_backends.py      # writes tests/bench/results/backends.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _held_bytes(parameters, optimizer) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards only)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    total = 0
    for p in parameters:
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for state in optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in state.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def run_rank(rank: int, world: int, kind: str, address: str, steps: int, out: str) -> None:
    from bench_learner import agent_group

    from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
    from arborl.learner.settings import LearnerSettings
    from arborl.learner.train_step import StepConfig, train_step

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    folder = resolve_model(DEFAULT_MODEL)
    settings = LearnerSettings(lr=1e-6)
    if kind in ("fsdp", "megatron"):
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world,
                                timeout=timedelta(minutes=10))
    if kind == "fsdp":
        from arborl.learner.backends.fsdp_backend import FsdpBackend

        backend = FsdpBackend.open(folder, settings)
        parameters, optimizer = list(backend.root.parameters()), backend.optimizer
    elif kind == "megatron":
        from arborl.learner.backends.megatron_backend import MegatronBackend

        backend = MegatronBackend.open(folder, LearnerSettings(lr=1e-6, backend="megatron", nproc=world))
        parameters, optimizer = list(backend.model.parameters()), backend.optimizer
    else:
        from arborl.learner.backends.torch_backend import TorchBackend

        backend = TorchBackend.open(folder, settings)
        parameters, optimizer = list(backend.model.parameters()), backend.optimizer
    from transformers import AutoConfig

    group = agent_group(AutoConfig.from_pretrained(folder).vocab_size)
    config = StepConfig(token_budget=1024)
    seconds, tokens, micro = [], 0.0, 0.0
    for step in range(steps + 1):
        started = time.perf_counter()
        metrics = train_step(backend, group, config)
        if step:  # the first step warms up
            seconds.append(time.perf_counter() - started)
        tokens, micro = metrics["tokens"], metrics["micro_batches"]
        if rank == 0:
            print(f"  {kind} x{world}: step {step}/{steps} {time.perf_counter() - started:.2f} s", flush=True)
    result = {"rank": rank, "step_seconds": statistics.median(seconds), "tokens": tokens, "micro_batches": micro,
              "held_mib": _held_bytes(parameters, optimizer) / 2**20,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(f"{out}.{kind}.{world}.{rank}.json").write_text(json.dumps(result))
    backend.close()
    if kind in ("fsdp", "megatron"):
        torch.distributed.destroy_process_group()


def _address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "backends.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = str(args.out.with_suffix(""))
    rows = []
    kinds = [("torch", 1), ("fsdp", 2)]
    if importlib.util.find_spec("megatron") is not None:
        kinds += [("megatron", 1), ("megatron", 2)]
    else:
        print("megatron-core is not installed: its rows are left out (pip install 'arborl[megatron]')")
    for kind, world in kinds:
        print(f"{kind}: {world} process(es)", flush=True)
        mp.start_processes(run_rank, args=(world, kind, _address(), args.steps, scratch), nprocs=world,
                           start_method="spawn")
        for rank in range(world):
            path = Path(f"{scratch}.{kind}.{world}.{rank}.json")
            rows.append({"backend": kind, "ranks": world, **json.loads(path.read_text())})
            path.unlink()
    base = rows[0]["step_seconds"]
    print(f"\n{'backend':<8} {'ranks':>5} {'rank':>4} {'step s':>8} {'vs torch':>9} {'tokens/s':>9} {'micro':>6} "
          f"{'held MiB':>9} {'peak RSS MiB':>13}")
    for row in rows:
        row["speed_vs_torch"] = base / row["step_seconds"]
        row["tokens_per_second"] = row["tokens"] / row["step_seconds"]
        print(f"{row['backend']:<8} {row['ranks']:>5} {row['rank']:>4} {row['step_seconds']:>8.2f} "
              f"{row['speed_vs_torch']:>8.2f}x "
              f"{row['tokens_per_second']:>9.0f} {row['micro_batches']:>6.0f} {row['held_mib']:>9.0f} "
              f"{row['peak_rss_mib']:>13.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "cores": os.cpu_count(), "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
