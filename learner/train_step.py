"""One optimisation step on groups of rollouts: plan, old pass, advantages, train pass, update.

    tries --plan_micro_batches--> micro-batches (tree packing, or a per-call / per-rollout baseline)
    old pass, no grad: logp_old (MCLA, K forwards), entropy, teacher and reference logprobs
        (skipped for the policy when one deterministic pass would do: see ``old_pass_needed``)
    rewards --group_advantages--> A_i --rescale_advantages (difficulty, entropy)--> A'_i
    train pass: forward with grad --> logp; IcePop weights from logp_old vs the recorded logp_rollout;
        the loss (turn-level GSPO by default) per micro-batch, backward
    gradient clipping, optimizer step and the learning-rate schedule

The step speaks only to a training backend (``learner.backends``): the torch backend on one
device, or one data-parallel rank of several (fsdp), each running its share of the micro-batches
and meeting the others in the backend's collectives (summed counts, FSDP's gathers).

The rollouts of a group usually share one trie (``learner.group_data`` builds it), so their shared
prompt is computed once. Each micro-batch's loss is already its share of the batch loss (the
"mean over rollouts" uses the batch's rollout count and each rollout's batch-wide call or token
count), so gradients simply add up across micro-batches.

Invariants:
- every call's completion follows at least one prompt token (``plan_micro_batches`` refuses one
  that does not: its first token would have no context, so a NaN logprob and entropy);
- a step whose loss or gradient norm is not finite takes no optimizer (or schedule) step: the
  weights and the optimizer state stay as they were, the gradients are dropped, and its metrics
  say ``skipped = 1`` (the caller must not publish it; ``learner.loop`` drops its groups);
- every model the step runs (policy, teachers, reference) ends on the attention implementation
  it had (``tree_forward.tree_attention``);
- metrics that are fractions are over the whole step, so they do not depend on the layout or the
  token budget (``clip_frac``: see ``_micro_loss``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from arborl.kernels.tree_attention import BLOCKS
from arborl.rollout.trie import Trie

from .backends.base import Scorer, TrainingBackend, refuse_unknown_attention
from .core_algos import (
    group_advantages,
    icepop_weights,
    kl_to_reference,
    masked_sft_loss,
    opd_advantages,
    rescale_advantages,
    rollout_mismatch_stats,
    sequence_gspo_loss,
    token_ppo_loss,
    turn_gspo_loss,
)
from .logp_old import logp_old_and_entropy
from .packing import CallSpan, PackedBatch, pack, path_length, split_by_budget

Layout = Literal["tree", "per_rollout", "per_call"]
LossName = Literal["turn_gspo", "sequence_gspo", "token_ppo", "sft"]


@dataclass
class RolloutSample:
    """One rollout to learn from: its calls (trainable ones only) in a trie, its reward and group.

    Rollouts of one group should share one ``Trie`` object; then tree packing computes their
    common prefix once.
    """

    trie: Trie
    calls: list[CallSpan]
    reward: float
    group: int
    # Per call key: the logprobs the serving engine recorded for its completion tokens.
    logp_rollout: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    domain: str = ""  # picks the distillation teacher, if any
    # Feedback on production sessions: a fixed advantage (reward minus a running baseline) in place
    # of the group's, and, for the ``sft`` loss, which completion tokens to imitate (per call key;
    # 0 on failed tool calls). None: not given.
    advantage: float | None = None
    sft_mask: dict[Hashable, torch.Tensor] | None = None


@dataclass
class StepConfig:
    token_budget: int = 8192
    layout: Layout = "tree"  # per_rollout and per_call are the baselines tree packing is measured against
    loss: LossName = "turn_gspo"
    mcla_passes: int = 1
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    ratio_mode: Literal["mean", "product"] = "mean"
    use_std: bool = True
    icepop: bool = True
    difficulty_lambda: float = 0.0  # difficulty-aware rescaling (KAT-Coder uses 0.5); 0 = off
    entropy_mu: float = 0.0  # entropy-aware rescaling (0.1 in DESIGN's worked example); 0 = off
    opd_lambda: float = 1.0  # weight of on-policy distillation where the rollout's domain has a teacher
    kl_coef: float = 0.0  # KL to the reference policy (needs ``reference``)
    max_grad_norm: float = 1.0
    attention: str = BLOCKS  # tree attention: cost follows each token's ancestors, not the pack's N^2


@dataclass
class MicroBatch:
    """One packed forward pass and the calls it trains."""

    batch: PackedBatch
    calls: list[CallSpan]
    call_rollout: torch.Tensor  # [calls] index of each call's rollout in the step
    flat: torch.Tensor  # completion token indices into the batch, call after call
    call_ids: torch.Tensor  # [tokens] which of ``calls`` each completion token belongs to
    logp_old: torch.Tensor | None = None  # [tokens], from the old pass
    entropy: torch.Tensor | None = None  # [tokens]
    logp_teacher: torch.Tensor | None = None  # [tokens]; NaN where the rollout has no teacher
    logp_ref: torch.Tensor | None = None  # [tokens]

    @property
    def token_rollout(self) -> torch.Tensor:
        return self.call_rollout[self.call_ids]


def plan_micro_batches(rollouts: Sequence[RolloutSample], budget: int, layout: Layout = "tree") -> list[MicroBatch]:
    """Lay the rollouts' calls out as micro-batches of at most ``budget`` tokens (whole calls).

    - ``tree``: the calls of every rollout sharing a trie are packed together, split by whole
      subtrees; shared prefixes (the group's prompt, earlier turns) are computed once per micro-batch.
    - ``per_rollout``: each rollout on its own (one sequence per rollout, plus its own branches).
    - ``per_call``: each call as its own sequence, prompt included (what a trainer without
      prefix sharing computes).

    Refuses (``ValueError``) a call without a prompt token: see :func:`check_calls_have_prompts`.
    """
    check_calls_have_prompts(rollouts)
    owner: dict[Hashable, int] = {}
    pieces: list[tuple[Trie, list[CallSpan]]] = []
    if layout == "tree":
        by_trie: dict[int, tuple[Trie, list[CallSpan]]] = {}
        for index, rollout in enumerate(rollouts):
            by_trie.setdefault(id(rollout.trie), (rollout.trie, []))[1].extend(rollout.calls)
            owner.update((call.key, index) for call in rollout.calls)
        for trie, calls in by_trie.values():
            pieces += [(trie, micro) for micro in split_by_budget(trie, calls, budget)]
    elif layout == "per_rollout":
        for index, rollout in enumerate(rollouts):
            owner.update((call.key, index) for call in rollout.calls)
            pieces += [(rollout.trie, micro) for micro in split_by_budget(rollout.trie, rollout.calls, budget)]
    elif layout == "per_call":
        for index, rollout in enumerate(rollouts):
            owner.update((call.key, index) for call in rollout.calls)
            pieces += [(rollout.trie, [call]) for call in rollout.calls]
    else:
        raise ValueError(f"layout must be tree, per_rollout or per_call, got {layout!r}")
    if len(owner) != sum(len(r.calls) for r in rollouts):
        raise ValueError("call keys must be unique across the rollouts of a step")
    micro_batches = []
    for trie, calls in pieces:
        batch = pack([(trie, calls)])
        call_tokens = [batch.completion_index[c.key] for c in calls]
        micro_batches.append(MicroBatch(
            batch=batch,
            calls=list(calls),
            call_rollout=torch.tensor([owner[c.key] for c in calls]),
            flat=torch.cat(call_tokens),
            call_ids=torch.cat([torch.full((i.numel(),), n) for n, i in enumerate(call_tokens)]),
        ))
    return micro_batches


def check_calls_have_prompts(rollouts: Sequence[RolloutSample]) -> None:
    """Refuse (``ValueError``) a call whose completion is its whole path: its first token sits at a
    trie root, with no context to read its logprob (and entropy) from, and one NaN in a step
    reaches every parameter (entropy-aware rescaling spreads it to every advantage)."""
    for rollout in rollouts:
        for call in rollout.calls:
            if call.completion_len >= path_length(rollout.trie, call):
                raise ValueError(
                    f"call {call.key!r} has no prompt ({call.completion_len} completion tokens on a path of "
                    f"{path_length(rollout.trie, call)}): its first completion token has no context to train on"
                )


def old_pass_needed(backend: TrainingBackend, config: StepConfig) -> bool:
    """Whether the policy needs its own no-grad pass for logp_old before the training pass.

    Not when one pass of a deterministic forward gives logp_old (K = 1): the weights change only
    after every micro-batch's backward, so the training forward's own logp, detached, *is* logp_old,
    and the step saves a forward (verl does the same when a batch is one on-policy mini-batch).
    MCLA (K > 1) averages noisy passes, and entropy-aware rescaling needs every rollout's entropy
    before the first loss, so both keep the pass.
    """
    return config.mcla_passes > 1 or bool(config.entropy_mu) or not backend.forward_is_deterministic()


def assign_to_ranks(micro_batches: Sequence[MicroBatch], ranks: int) -> list[list[int]]:
    """Which micro-batches each data-parallel rank runs: the biggest first to the least loaded
    rank (by tokens), each rank's in plan order. One rank runs them all, in plan order."""
    load = [0] * ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for index in sorted(range(len(micro_batches)), key=lambda i: -micro_batches[i].batch.num_tokens):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        load[rank] += micro_batches[index].batch.num_tokens
        owned[rank].append(index)
    return [sorted(indices) for indices in owned]


def _old_pass(backend: TrainingBackend, rounds: list[MicroBatch | None], rollouts, config: StepConfig,
              teachers: Mapping[str, Scorer], reference: Scorer | None, *, policy: bool) -> None:
    """No grad, per micro-batch: logp_old (MCLA) and entropy if ``policy``; teacher and reference
    logprobs. A round without a micro-batch of this rank's joins the others' policy forwards."""
    for micro in rounds:
        if micro is None:
            for _ in range(config.mcla_passes if policy else 0):
                backend.idle_pass(grad=False)
            continue
        if policy:
            micro.logp_old, micro.entropy = logp_old_and_entropy(backend, micro.batch, passes=config.mcla_passes,
                                                                 attention=config.attention, at=micro.flat)
        domains = [rollouts[int(i)].domain for i in micro.token_rollout]
        for domain in sorted(set(domains) & set(teachers)):
            scored = teachers[domain].score(micro.batch, attention=config.attention, at=micro.flat)[0]
            if micro.logp_teacher is None:
                # fp32 (fp64 for an fp64 student), like the logprobs the fused kernel gives
                micro.logp_teacher = torch.full(micro.flat.shape, float("nan"), device=scored.device,
                                                dtype=torch.promote_types(backend.dtype, torch.float32))
            rows = torch.tensor([d == domain for d in domains])
            micro.logp_teacher[rows] = scored[rows].to(micro.logp_teacher)
        if reference is not None and config.kl_coef > 0:
            micro.logp_ref = reference.score(micro.batch, attention=config.attention, at=micro.flat)[0]


def _rollout_entropy(backend: TrainingBackend, micro_batches: Sequence[MicroBatch], num_rollouts: int) -> torch.Tensor:
    """H_i: the mean entropy of each rollout's completion tokens (over every rank's micro-batches)."""
    sums = torch.zeros(2, num_rollouts, dtype=torch.float64)  # [entropy total, token count]
    for micro in micro_batches:
        assert micro.entropy is not None  # set by the old pass or the step's own forward
        sums[0].index_add_(0, micro.token_rollout, micro.entropy.detach().double().cpu())
        sums[1].index_add_(0, micro.token_rollout, torch.ones(micro.entropy.numel(), dtype=torch.float64))
    total, count = backend.all_reduce_sum(sums)
    return total / count.clamp_min(1)


def _micro_loss(micro: MicroBatch, logp, advantages, rollouts, sizes, config: StepConfig, weights):
    """The micro-batch's share of the batch loss, and the loss's stats.

    The stats' ``clipped`` and ``clip_units`` are counts, so the step adds them up over its
    micro-batches and ``clip_frac = sum clipped / sum clip_units`` is one definition whatever the
    layout: the share of the step's turns (turn-level GSPO; rollouts for sequence-level GSPO;
    tokens for token-level PPO and distillation) that have a token IcePop kept and whose clipped
    branch binds. SFT clips nothing (no units).
    """
    n = len(rollouts)
    if config.loss == "sft":
        # masked_sft_loss over the whole step: this micro-batch's tokens over every kept token
        owners = zip(micro.calls, micro.call_rollout, strict=True)
        mask = torch.cat([_sft_mask(rollouts[int(r)], call) for call, r in owners])
        share = mask.sum() / sizes["sft_tokens"].clamp_min(1)
        none = torch.tensor(0.0)
        return masked_sft_loss(logp, mask.to(logp)) * share.to(logp), {"clip_frac": none, "clipped": none,
                                                                        "clip_units": none}
    assert micro.logp_old is not None  # the old pass or the step's own forward set it
    if micro.logp_teacher is not None or config.loss == "token_ppo":
        token_adv = advantages[micro.token_rollout].to(logp)
        if micro.logp_teacher is not None:
            distilled = ~torch.isnan(micro.logp_teacher)
            term = opd_advantages(micro.logp_old, micro.logp_teacher.nan_to_num(), lam=config.opd_lambda)
            token_adv = token_adv + torch.where(distilled, term, torch.zeros_like(term)).to(logp)
        return token_ppo_loss(logp, micro.logp_old, token_adv, micro.token_rollout, n, agg="seq-mean-token-mean",
                              token_weights=weights, tokens_per_rollout=sizes["tokens"])
    if config.loss == "sequence_gspo":
        return sequence_gspo_loss(logp, micro.logp_old, advantages.to(logp), micro.token_rollout, n,
                                  eps_low=config.eps_low, eps_high=config.eps_high, mode=config.ratio_mode,
                                  token_weights=weights)
    if config.loss == "turn_gspo":
        return turn_gspo_loss(logp, micro.logp_old, advantages[micro.call_rollout].to(logp), micro.call_ids,
                              micro.call_rollout, n, eps_low=config.eps_low, eps_high=config.eps_high,
                              mode=config.ratio_mode, token_weights=weights, calls_per_rollout=sizes["calls"])
    raise ValueError(f"loss must be turn_gspo, sequence_gspo, token_ppo or sft, got {config.loss!r}")


def _sft_mask(rollout: RolloutSample, call: CallSpan) -> torch.Tensor:
    """The call's completion tokens to imitate: all of them unless the sample masks some."""
    if rollout.sft_mask is not None and call.key in rollout.sft_mask:
        return rollout.sft_mask[call.key].to(torch.float64)
    return torch.ones(call.completion_len, dtype=torch.float64)


def train_step(
    backend: TrainingBackend,
    rollouts: Sequence[RolloutSample],
    config: StepConfig,
    *,
    teachers: Mapping[str, Scorer] | None = None,
    reference: Scorer | None = None,
) -> dict[str, float]:
    """Update the backend's policy on ``rollouts``; returns the step's metrics (the same on every rank).

    Every data-parallel rank calls this with the same rollouts and config; each runs its share of
    the micro-batches (``assign_to_ranks``). ``teachers`` maps a task domain to a distillation
    teacher (same tokenizer; checked by whoever loads it); ``reference`` is the frozen policy for
    the optional KL term.

    ``metrics["skipped"]`` is 1 when the loss or the gradient norm was not finite: then neither
    the optimizer nor the schedule stepped and the weights are as they were (the metrics still
    report the non-finite figures); 0 for a step taken.
    """
    started = time.perf_counter()
    refuse_unknown_attention(backend.name, backend.attentions, config.attention)
    if config.loss == "sequence_gspo" and config.layout != "per_rollout" and any(len(r.calls) > 1 for r in rollouts):
        # The sequence ratio is over a rollout's whole completion, so each rollout must sit in one micro-batch.
        config = replace(config, layout="per_rollout", token_budget=1 << 62)
    micro_batches = plan_micro_batches(rollouts, config.token_budget, config.layout)
    owned = assign_to_ranks(micro_batches, backend.dp_size)
    mine = [micro_batches[i] for i in owned[backend.dp_rank]]
    # Every rank runs as many rounds as the busiest; in the rest it joins the others' collectives.
    rounds: list[MicroBatch | None] = [*mine, *[None] * (max(map(len, owned)) - len(mine))]
    # One scope for every pass and backward of the policy: a backward that recomputes a forward
    # (gradient checkpointing) must see the tree attention too.
    with backend.attention(config.attention):
        return _run_step(backend, rollouts, micro_batches, rounds, config,
                         teachers=teachers or {}, reference=reference, started=started)


def _run_step(
    backend: TrainingBackend,
    rollouts: Sequence[RolloutSample],
    micro_batches: list[MicroBatch],
    rounds: list[MicroBatch | None],
    config: StepConfig,
    *,
    teachers: Mapping[str, Scorer],
    reference: Scorer | None,
    started: float,
) -> dict[str, float]:
    """The body of :func:`train_step` on its planned micro-batches, inside the tree attention scope."""
    mine = [micro for micro in rounds if micro is not None]
    policy_pass = old_pass_needed(backend, config)
    _old_pass(backend, rounds, rollouts, config, teachers, reference, policy=policy_pass)

    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    groups = torch.tensor([r.group for r in rollouts])
    advantages = group_advantages(rewards, groups, use_std=config.use_std)
    if config.difficulty_lambda or config.entropy_mu:
        # Without the old pass entropy_mu is 0, so the entropies (not known yet) do not count.
        entropy = _rollout_entropy(backend, mine, len(rollouts)) if policy_pass else torch.zeros(len(rollouts))
        advantages = rescale_advantages(advantages, groups, (rewards > 0).double(), entropy,
                                        lam=config.difficulty_lambda, mu=config.entropy_mu)
    for index, rollout in enumerate(rollouts):  # feedback: reward against a running baseline
        if rollout.advantage is not None:
            advantages[index] = rollout.advantage
    dtype = backend.dtype  # what the packed logprobs come out in
    sizes = {
        "calls": torch.tensor([len(r.calls) for r in rollouts], dtype=dtype),
        "tokens": torch.tensor([sum(c.completion_len for c in r.calls) for r in rollouts], dtype=dtype),
    }
    if config.loss == "sft":
        kept = sum(float(_sft_mask(r, c).sum()) for r in rollouts for c in r.calls)
        sizes["sft_tokens"] = torch.tensor(kept, dtype=dtype)

    backend.zero_grad()
    # This rank's sums, then every rank's: loss, clipped, clip_units, kl, tokens, completion
    # tokens, tokens scored for mismatch, then each mismatch figure times its token count.
    totals = torch.zeros(len(_TOTALS) + len(_MISMATCH), dtype=torch.float64)
    for micro in rounds:
        if micro is None:
            backend.idle_pass(grad=True)
            continue
        logp, entropy = backend.score(micro.batch, attention=config.attention, at=micro.flat, grad=True)
        if not policy_pass:  # one deterministic pass: this forward's own logp is logp_old
            micro.logp_old, micro.entropy = logp.detach(), entropy.detach()
        assert micro.logp_old is not None  # the old pass set it otherwise
        weights = None
        owners = zip(micro.calls, micro.call_rollout, strict=True)
        found = (rollouts[int(r)].logp_rollout.get(c.key) for c, r in owners)
        recorded = [call_logp for call_logp in found if call_logp is not None]
        if config.icepop and len(recorded) == len(micro.calls):
            logp_rollout = torch.cat(recorded).to(micro.logp_old)
            weights = icepop_weights(micro.logp_old, logp_rollout)
            stats = rollout_mismatch_stats(micro.logp_old, logp_rollout)
            scored = micro.flat.numel()
            totals[_TOTALS.index("mismatch_tokens")] += scored
            for k, key in enumerate(_MISMATCH):
                totals[len(_TOTALS) + k] += float(stats[key]) * scored
        loss, stats = _micro_loss(micro, logp, advantages, rollouts, sizes, config, weights)
        if micro.logp_ref is not None:
            kl = kl_to_reference(logp, micro.logp_ref)
            kl_loss = (kl / sizes["tokens"][micro.token_rollout].clamp_min(1)).sum() / len(rollouts)
            loss = loss + config.kl_coef * kl_loss
            totals[_TOTALS.index("kl")] += float(kl_loss.detach())
        backend.backward(loss)
        for key, value in (("loss", float(loss.detach())), ("clipped", float(stats["clipped"])),
                           ("clip_units", float(stats["clip_units"])), ("tokens", micro.batch.num_tokens),
                           ("completion_tokens", int(micro.flat.numel()))):
            totals[_TOTALS.index(key)] += value
    total = dict(zip(_TOTALS + _MISMATCH, backend.all_reduce_sum(totals).tolist(), strict=True))
    grad_norm = backend.clip_grad_norm(config.max_grad_norm)
    skipped = not (math.isfinite(total["loss"]) and math.isfinite(grad_norm))
    if skipped:
        # A NaN or inf would reach every weight through the optimizer (and AdamW's moments would
        # keep it): take no step, and drop the gradients so nothing non-finite is left behind.
        backend.zero_grad()
    else:
        backend.optimizer_step()
    seconds = time.perf_counter() - started
    metrics = {
        "loss": total["loss"],
        "clip_frac": total["clipped"] / max(total["clip_units"], 1.0),
        "grad_norm": grad_norm,
        "skipped": float(skipped),
        "entropy": float(_rollout_entropy(backend, mine, len(rollouts)).mean()),
        "reward_mean": float(rewards.mean()),
        "tokens": total["tokens"],
        "completion_tokens": total["completion_tokens"],
        "micro_batches": float(len(micro_batches)),
        "step_seconds": seconds,
        "tokens_per_second": total["tokens"] / seconds,
        "lr": backend.lr,
    }
    if reference is not None and config.kl_coef > 0:
        metrics["kl_ref"] = total["kl"]
    if total["mismatch_tokens"]:  # mismatch_abs, mismatch_kl, icepop_zeroed_frac: token means over the step's tokens
        for key in _MISMATCH:
            metrics[key] = total[key] / total["mismatch_tokens"]
    return metrics


_TOTALS = ("loss", "clipped", "clip_units", "kl", "tokens", "completion_tokens", "mismatch_tokens")
_MISMATCH = ("mismatch_abs", "mismatch_kl", "icepop_zeroed_frac")  # core_algos.rollout_mismatch_stats
