"""The training-backend seam: what a training step needs from whatever holds the weights.

    train_step  --score / backward / clip / step-->  TrainingBackend  (torch: one process;
                                                                       fsdp, megatron: one rank
                                                                       of many)
    teachers, the reference policy  --score-->  Scorer

A backend is one data-parallel rank's view of the model being trained. The step plans the same
micro-batches on every rank (every rank gets every rollout), takes its own share of them, and
meets the other ranks only where a backend says: ``all_reduce_sum`` of its counts and totals,
and the collectives hidden in ``score`` / ``backward`` (FSDP all-gathers parameters in a forward
and reduce-scatters gradients in a backward). So:

Invariants every backend keeps:
- gradients add up: the gradient after a step's backwards is the sum over ranks and micro-batches
  of each loss's gradient (each micro-batch's loss is already its share of the batch loss), never
  a mean over ranks, so a step's update does not depend on how many ranks ran it;
- every rank runs the same sequence of collective calls: a rank with fewer micro-batches joins the
  others' forwards and backwards with ``idle_pass`` (no contribution);
- ``clip_grad_norm`` returns the norm of the whole (all ranks') gradient, the same on every rank;
- a setting the backend cannot honour is refused when the backend opens (``BackendRefused``),
  never silently ignored.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from arborl.learner.packing import PackedBatch


class BackendRefused(ValueError):
    """A backend cannot run as configured (an attention it lacks, a noisy forward it cannot average)."""


def refuse_unknown_attention(backend: str, attentions: frozenset[str], attention: str) -> None:
    """Raise ``BackendRefused`` unless the backend runs tree attention ``attention``."""
    if attention not in attentions:
        raise BackendRefused(f"the {backend} backend does not run attention {attention!r} "
                             f"(it runs {', '.join(sorted(attentions))})")


class Scorer(Protocol):
    """Something that scores a packed micro-batch: the policy, a distillation teacher, the reference."""

    def score(self, batch: PackedBatch, *, attention: str, at: torch.Tensor | None = None,
              grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's logprob given its path and its distribution's entropy (NaN at roots):
        [N], or [len(at)] at the token indices ``at``; with autograd if ``grad``."""
        ...


class TrainingBackend(Scorer, Protocol):
    """One data-parallel rank of the policy being trained (see the module docstring)."""

    name: str
    rank: int  # the process's rank in the whole group: rank 0 writes what is written once
    dp_rank: int  # its data-parallel rank (tensor-parallel peers share one) and their number
    dp_size: int
    attentions: frozenset[str]  # the tree attention implementations it runs (kernels.tree_attention)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (logprobs come out in it, at least float32)."""
        ...

    def forward_is_deterministic(self) -> bool:
        """Whether two forwards of one batch give the same logprobs (no dropout or router noise)."""
        ...

    def attention(self, name: str) -> AbstractContextManager[None]:
        """Run on tree attention ``name`` inside the block, backwards included (a backward may
        recompute a forward); on the way out the model is on the attention it had."""
        ...

    def idle_pass(self, *, grad: bool) -> None:
        """Join the other ranks' forward (and, if ``grad``, backward) without contributing."""
        ...

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the data-parallel ranks (float64 on the CPU), on every rank."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def zero_grad(self) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the whole gradient to ``max_norm``; its norm before clipping (inf/NaN if not finite)."""
        ...

    def optimizer_step(self) -> None:
        """One optimizer step and one step of the learning-rate schedule."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        ...

    def set_base_lr(self, lr: float) -> None:
        """A new base rate for the schedule, from the next step on; the schedule keeps its position."""
        ...

    def barrier(self) -> None:
        """Wait for every rank (a no-op with one)."""
        ...

    def save(self, folder: Path, *, step: int, version: int) -> None:
        """Collective: write the weights as a Hugging Face safetensors folder (any engine loads it)
        and everything a resume needs (optimizer, schedule, step, version, RNG) into ``folder``;
        returns on every rank once every rank's part is written."""
        ...

    def load_training_state(self, folder: Path) -> dict[str, Any]:
        """Collective: restore what ``save`` wrote (weights, optimizer, schedule, RNG); returns
        ``{"step": ..., "version": ...}``."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model's weights, Hugging Face names (on rank 0; {} elsewhere)."""
        ...

    def close(self) -> None: ...

