"""``logp_old`` for a packed batch: the training model's own logprobs before the step (MCLA).

The policy-gradient ratio compares the model being trained with the same model before the
step. With a deterministic forward one pass gives it exactly. When the forward is noisy (MoE
routing, dropout), one pass is a noisy estimate, and MCLA averages K passes: the variance of
the estimate falls about as 1/K, at K - 1 extra forwards (no backward, so FlexAttention serves
here even on the CPU).
"""

from __future__ import annotations

from typing import Literal

import torch

from arborl.kernels.tree_attention import SDPA

from .backends.base import Scorer
from .core_algos import mcla_logp_old
from .packing import PackedBatch


def estimate_logp_old(
    policy: Scorer, batch: PackedBatch, *, passes: int = 1, space: Literal["log", "prob"] = "log", attention: str = SDPA
) -> torch.Tensor:
    """[N] logp_old of every packed token: the mean of ``passes`` no-grad forwards (K = 1: one pass)."""
    return logp_old_and_entropy(policy, batch, passes=passes, space=space, attention=attention)[0]


def logp_old_and_entropy(
    policy: Scorer,
    batch: PackedBatch,
    *,
    passes: int = 1,
    space: Literal["log", "prob"] = "log",
    attention: str = SDPA,
    at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``estimate_logp_old`` and, from the same K passes, each token's entropy (their mean); at
    the token indices ``at`` only, if given."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    logp, entropy = zip(*(policy.score(batch, attention=attention, at=at) for _ in range(passes)), strict=True)
    return mcla_logp_old(torch.stack(logp), space=space), torch.stack(entropy).mean(0)
