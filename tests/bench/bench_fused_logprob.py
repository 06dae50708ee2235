"""Peak memory and time of the fused chunked logprob + entropy against naive ``log_softmax``.

Run ``python tests/bench/bench_fused_logprob.py [--quick]``. Both variants compute, for random fp32
tensors of the default model's LM-head shapes (SmolLM2-135M: vocabulary 49,152, hidden 576) at
8,192 tokens, ``logp(target)`` and the entropy, then the loss ``(a * logp).sum() + (c * H).sum()``
with random a, c, and its gradients in hidden and weight (forward + backward):

  naive  ``log_softmax(hidden @ W.T)``, ``.gather``, ``-(p * log p).sum(-1)``, autograd
  fused  ``arborl.kernels.fused_logprob.token_logprob_and_entropy`` (chunks of 1,024 tokens)

How peak memory is measured on the CPU. There is no CPU counterpart of
``torch.cuda.max_memory_allocated``, and ``tracemalloc`` sees only Python's allocator, not torch's.
So every measurement runs in a fresh subprocess, which reads its own peak resident set size: it
builds the inputs, warms up on 256 tokens, resets the kernel's high-water mark (``5`` written to
``/proc/self/clear_refs``, which sets VmHWM to the current RSS), records VmRSS, runs forward +
backward once, and reads VmHWM. Peak extra memory is VmHWM minus that VmRSS: everything the pass
held at once (logits, autograd's saved tensors, gradients), inputs excluded. RSS is a faithful
measure here because the torch CPU allocator gets every large tensor from ``mmap`` and gives it
back to the kernel when freed, and every byte allocated is written. Where clear_refs is refused,
the script says so and falls back to the high-water mark since start, which still includes the
(small) setup.

Variants alternate over ``--repeats`` rounds (one fresh process each), so drift in the machine's
load hits both alike; the table shows the median time and the largest peak. Each run also records
how many cores other processes kept busy. The losses and gradient norms of the two must agree.
Progress goes to stderr; the table to stdout and ``tests/bench/results/fused_logprob.json`` (or
``--out``). ``--quick`` uses tiny sizes only to check that the script works, and writes a file only
when given ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
MIB = 2**20
WARMUP_TOKENS = 256


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process; returns its figures."""
    import torch
    import torch.nn.functional as F

    from arborl.kernels.fused_logprob import token_logprob_and_entropy

    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5 * 2).requires_grad_()
    targets = torch.randint(args.vocab, (args.tokens,), generator=gen)
    a, c = torch.randn(2, args.tokens, generator=gen)

    def step(n: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        h, t = hidden[:n], targets[:n]
        if args.worker == "naive":
            logp_all = F.log_softmax(h @ weight.T, dim=-1)
            logp = logp_all.gather(1, t[:, None]).squeeze(1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            del logp_all  # autograd keeps what it needs; drop the Python reference like real code would
        else:
            logp, entropy = token_logprob_and_entropy(h, weight, t, chunk_size=args.chunk_size)
        loss = (a[:n] * logp).sum() + (c[:n] * entropy).sum()
        g_hidden, g_weight = torch.autograd.grad(loss, [hidden, weight])
        return loss.item(), g_hidden, g_weight

    step(WARMUP_TOKENS)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base_kib = _status_kib("VmRSS")
    busy0, own0, wall0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    loss, g_hidden, g_weight = step(args.tokens)
    wall1, own1, busy1 = time.perf_counter(), _own_cpu_seconds(), _machine_busy_seconds()
    peak_kib = _status_kib("VmHWM")
    seconds = wall1 - wall0
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds
    return {
        "peak_extra_mib": (peak_kib - base_kib) * 1024 / MIB,
        "baseline_rss_mib": base_kib * 1024 / MIB,
        "hwm_reset": hwm_reset,
        "seconds": seconds,
        "other_processes_cpu_cores": other,
        "loss": loss,
        "grad_hidden_norm": g_hidden.norm().item(),
        "grad_weight_norm": g_weight.norm().item(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_worker(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant]
    for name in ("tokens", "vocab", "hidden", "chunk_size", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(results: dict) -> str:
    s, full = results["summary"], results["full_logits_fp32_mib"]
    title = (
        f"Fused logprob + entropy, fp32, forward + backward: {results['tokens']} tokens, vocabulary "
        f"{results['vocab']}, hidden {results['hidden']} (one [N, V] fp32 logits tensor = {full:.0f} MiB)"
    )
    rows = [
        ("naive log_softmax", s["naive"]["peak_extra_mib"], s["naive"]["seconds"]),
        (f"fused (chunk {results['chunk_size']})", s["fused"]["peak_extra_mib"], s["fused"]["seconds"]),
    ]
    lines = [
        title,
        "",
        "| variant | peak extra memory (MiB) | fwd+bwd time (s, median) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {mib:.0f} | {seconds:.2f} |" for name, mib, seconds in rows]
    lines.append(f"| ratio naive / fused | {s['memory_ratio']:.1f}x | {s['time_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, only to check the script works")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs both variants once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results file (default results/fused_logprob.json)")
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.tokens, args.vocab, args.hidden, args.chunk_size, args.repeats = 1024, 4096, 64, 256, 1

    started = time.perf_counter()
    runs: dict[str, list[dict]] = {"naive": [], "fused": []}
    for round_ in range(args.repeats):
        for variant in ("naive", "fused"):
            _log(f"round {round_ + 1}/{args.repeats}: {variant} ({args.tokens} tokens, vocab {args.vocab})")
            run = run_worker(variant, args)
            runs[variant].append(run)
            _log(f"  peak extra {run['peak_extra_mib']:.0f} MiB, {run['seconds']:.2f} s")
            if not run["hwm_reset"]:
                _log("  warning: /proc/self/clear_refs refused: peak includes the setup")
            if (run["other_processes_cpu_cores"] or 0) > 0.1:
                _log(f"  warning: other processes kept {run['other_processes_cpu_cores']:.2f} cores busy")

    naive0, fused0 = runs["naive"][0], runs["fused"][0]
    for key in ("loss", "grad_hidden_norm", "grad_weight_norm"):
        if abs(naive0[key] - fused0[key]) > 1e-4 * max(1.0, abs(naive0[key])):
            raise SystemExit(f"naive and fused disagree on {key}: {naive0[key]} vs {fused0[key]}")

    summary = {
        variant: {
            "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
        }
        for variant, rs in runs.items()
    }
    summary["memory_ratio"] = summary["naive"]["peak_extra_mib"] / summary["fused"]["peak_extra_mib"]
    summary["time_ratio"] = summary["naive"]["seconds"] / summary["fused"]["seconds"]
    results = {
        "mode": "quick" if args.quick else "full",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "chunk_size": args.chunk_size,
        "dtype": "float32",
        "repeats": args.repeats,
        "full_logits_fp32_mib": args.tokens * args.vocab * 4 / MIB,
        "memory_method": "fresh subprocess per run; VmHWM - VmRSS after resetting VmHWM via /proc/self/clear_refs",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": naive0["torch"]},
        "summary": summary,
        "runs": runs,
        "elapsed_s": time.perf_counter() - started,
    }
    path = args.out or (None if args.quick else RESULTS_DIR / "fused_logprob.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    _log(f"done in {results['elapsed_s']:.0f} s" + (f"; figures written to {path}" if path else ""))


if __name__ == "__main__":
    main()
