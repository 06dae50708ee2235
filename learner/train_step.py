"""One optimisation step on groups of rollouts: advantages, packing, logp_old, loss, update.

    rewards --group_advantages--> A_i (per rollout) --> A_n = A_i for each of its calls
    tries --split_by_budget/pack--> micro-batches --estimate_logp_old--> logp_old (MCLA, K passes)
    forward with grad --> logp; IcePop weights from logp_old vs the recorded logp_rollout
    turn_gspo_loss (default) per micro-batch, summed so the micro-batches make the batch's loss
    gradient clipping, optimizer step

Each micro-batch's loss is already its share of the batch loss (the "mean over rollouts" uses
the batch's rollout count and each rollout's batch-wide call count), so gradients simply add up.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from arborl.kernels.tree_attention import SDPA
from arborl.rollout.trie import Trie

from .core_algos import group_advantages, icepop_weights, rollout_mismatch_stats, turn_gspo_loss
from .logp_old import estimate_logp_old
from .packing import CallSpan, pack, split_by_budget
from .tree_forward import packed_token_logprobs


@dataclass
class RolloutSample:
    """One rollout to learn from: its trie, its calls (main agent only), its reward and group."""

    trie: Trie
    calls: list[CallSpan]
    reward: float
    group: int
    # Per call key: the logprobs the serving engine recorded for its completion tokens.
    logp_rollout: dict[Hashable, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepConfig:
    token_budget: int = 8192
    mcla_passes: int = 1
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    ratio_mode: str = "mean"
    use_std: bool = True
    icepop: bool = True
    max_grad_norm: float = 1.0
    attention: str = SDPA


def train_step(model, optimizer, rollouts: Sequence[RolloutSample], config: StepConfig) -> dict[str, float]:
    """Update ``model`` on ``rollouts``; returns the step's metrics."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    groups = torch.tensor([r.group for r in rollouts])
    advantages = group_advantages(rewards, groups, use_std=config.use_std)
    calls_per_rollout = torch.tensor([len(r.calls) for r in rollouts], dtype=torch.float64)

    optimizer.zero_grad(set_to_none=True)
    total_loss, clipped, turns, tokens = 0.0, 0.0, 0, 0
    mismatch = []
    for index, rollout in enumerate(rollouts):
        for micro in split_by_budget(rollout.trie, rollout.calls, config.token_budget):
            batch = pack([(rollout.trie, micro)])
            logp_old_all = estimate_logp_old(model, batch, passes=config.mcla_passes, attention=config.attention)
            logp_all = packed_token_logprobs(model, batch, attention=config.attention)
            flat = torch.cat([batch.completion_index[c.key] for c in micro])
            call_ids = torch.cat([torch.full((batch.completion_index[c.key].numel(),), n) for n, c in enumerate(micro)])
            logp, logp_old = logp_all[flat], logp_old_all[flat]
            weights = None
            if config.icepop and all(c.key in rollout.logp_rollout for c in micro):
                logp_rollout = torch.cat([rollout.logp_rollout[c.key] for c in micro]).to(logp_old)
                weights = icepop_weights(logp_old, logp_rollout)
                mismatch.append(rollout_mismatch_stats(logp_old, logp_rollout))
            loss, stats = turn_gspo_loss(
                logp, logp_old, advantages[index].expand(len(micro)).to(logp), call_ids,
                torch.full((len(micro),), index), len(rollouts), eps_low=config.eps_low, eps_high=config.eps_high,
                mode=config.ratio_mode, token_weights=weights, calls_per_rollout=calls_per_rollout.to(logp),
            )
            loss.backward()
            total_loss += float(loss.detach())
            clipped += float(stats["clip_frac"]) * len(micro)
            turns += len(micro)
            tokens += batch.num_tokens
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    metrics = {"loss": total_loss, "clip_frac": clipped / max(turns, 1), "grad_norm": float(grad_norm),
               "tokens": float(tokens), "reward_mean": float(rewards.mean())}
    if mismatch:
        for key in mismatch[0]:
            metrics[key] = sum(float(m[key]) for m in mismatch) / len(mismatch)
    return metrics
