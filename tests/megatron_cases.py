"""Gradient-equivalence cases for the megatron backend, run on gloo ranks (tests/integration/test_megatron_backend.py).

The cases are the fsdp suite's (``fsdp_cases``: tiny random Llamas in float64, agent-shaped
rollouts in shared tries, every kind of step). Every rank runs ``train_step`` on the megatron
backend with the given tensor-parallel size (the rest of the ranks are data-parallel); the ranks
gather each parameter's gradient, and rank 0 maps them to Hugging Face names and writes them with
the step's metrics and the weights after the step. After the last case, each layout also writes a
checkpoint, reopens it and restores its training state (the resume path).

One test shim, here and never in the product: :func:`float64_hf_rms_norm`. Hugging Face's
LlamaRMSNorm computes in float32 even in a float64 model, so at 1e-9 it is not the reference
megatron's float64 RMSNorm can be held to; the torch reference (and the teachers and the reference
policy, Hugging Face models on these ranks too) run with the same norm computed in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from fsdp_cases import join_group


@contextmanager
def float64_hf_rms_norm() -> Iterator[None]:
    """Hugging Face's Llama and Qwen2 RMSNorms in the input's dtype (the same formula, no float32
    round trip)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    originals = {norm: norm.forward for norm in (LlamaRMSNorm, Qwen2RMSNorm)}
    for norm in originals:
        norm.forward = forward
    try:
        yield
    finally:
        for norm, original in originals.items():
            norm.forward = original


def run_cases(rank: int, world: int, address: str, folder: Path, device: str, tensor_parallel: int) -> None:
    """One rank: every case in ``folder/cases.pt``; rank 0 writes ``folder/results.pt`` (on the CPU:
    gloo; ``device="cuda"``: NCCL, rank r on cuda:r)."""
    import torch.distributed as dist

    from arborl.learner.backends.hf_model import load_frozen
    from arborl.learner.backends.megatron_backend import MegatronBackend
    from arborl.learner.backends.megatron_weights import to_hf
    from arborl.learner.backends.torch_backend import TorchBackend
    from arborl.learner.checkpoint import save_checkpoint
    from arborl.learner.settings import LearnerSettings
    from arborl.learner.train_step import train_step

    where = join_group(rank, world, address, device)
    settings = LearnerSettings(lr=1e-3, backend="megatron", nproc=world, tensor_parallel=tensor_parallel)
    cases = torch.load(folder / "cases.pt", weights_only=False)
    results: dict = {}
    with float64_hf_rms_norm():
        for case, samples in cases:
            weights = folder / case.name
            backend = MegatronBackend.open(weights, settings, dtype=torch.float64, device=where)
            teachers = ({"math": TorchBackend(load_frozen(folder / "teacher", dtype=torch.float64, device=where))}
                        if case.teacher else {})
            reference = (TorchBackend(load_frozen(weights, dtype=torch.float64, device=where))
                         if case.reference else None)
            metrics = train_step(backend, samples, case.config, teachers=teachers, reference=reference)
            # The gradients the step left (clip bound huge: the loss's own), every rank's shards.
            local = {name: p.grad.detach().cpu() for name, p in backend.model.named_parameters()}
            everyone: list = [None] * world
            dist.all_gather_object(everyone, (backend.tp_rank, backend.dp_rank, local))
            after = backend.full_state_dict()
            if rank == 0:
                # One data-parallel copy's TP shards, in TP order (DP copies hold summed, equal grads).
                shards = [grads for _, _, grads in sorted(e for e in everyone if e[1] == 0)]
                results[case.name] = {"metrics": metrics, "grads": to_hf(backend.hf_config, shards), "weights": after}
            last = case, backend
            if case is not cases[-1][0]:
                backend.close()
        case, backend = last
        checkpoint = save_checkpoint(folder / "checkpoint", backend, step=7, version=3)
        written = {i: {k: v.clone() for k, v in state.items()}
                   for i, state in backend.optimizer.state_dict()["state"].items()}
        backend.close()
        reopened = MegatronBackend.open(checkpoint, settings, dtype=torch.float64, device=where)
        resumed = reopened.load_training_state(checkpoint)
        restored = reopened.optimizer.state_dict()["state"]
        same_optimizer = written.keys() == restored.keys() and all(
            torch.equal(value, restored[i][key]) for i, state in written.items() for key, value in state.items())
        reloaded = reopened.full_state_dict()
        if rank == 0:
            results["resume"] = {"state": resumed, "same_optimizer": same_optimizer, "weights": reloaded,
                                 "last_case": case.name}
        reopened.close()
    if rank == 0:
        torch.save(results, folder / "results.pt")
    dist.destroy_process_group()
