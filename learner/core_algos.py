"""Losses and advantage estimators of the learner (DESIGN.md section 5), one function each.

Everything here is plain torch over flat tensors. The learner packs many calls (turns) of many rollouts into
one flat sequence; per completion token it holds

- ``logp`` (log pi_theta, with grad), ``logp_old`` (log pi_old, the training model before the step, e.g. from
  :func:`mcla_logp_old`) and ``logp_rollout`` (what the serving engine recorded when it sampled the token);
- ``call_ids``: the token's call (turn) index, dense in ``[0, num_calls)`` over the batch;
- ``rollout_ids``: the token's rollout index, dense in ``[0, num_rollouts)``;

per call ``call_rollout`` (the rollout that made it), and per rollout a reward and a group id.

Conventions: advantages, ``logp_old``, ``logp_rollout`` and token weights are detached inside every loss, so
gradients reach ``logp`` only. Log-ratios are clamped to [-20, 20] before ``exp`` (as verl does), so a wild
ratio cannot overflow. Loss functions return ``(loss, stats)``; ``stats`` holds detached 0-d tensors (call
``float()`` when logging; nothing here forces a device sync).

Micro-batches: a packed micro-batch may hold only part of a rollout's calls. The "mean over rollouts" losses
therefore take the batch-wide ``num_rollouts`` and an optional batch-wide per-rollout size
(``calls_per_rollout`` / ``tokens_per_rollout``); a rollout absent from the micro-batch contributes 0, and the
losses of the micro-batches then sum to the loss of the whole batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

RatioMode = Literal["mean", "product"]
TokenAgg = Literal["token-mean", "seq-mean-token-mean"]

LOG_RATIO_CLAMP = 20.0

__all__ = [
    "check_same_tokenizer",
    "difficulty_factors",
    "entropy_factors",
    "group_advantages",
    "icepop_weights",
    "kl_to_reference",
    "masked_sft_loss",
    "mcla_logp_old",
    "opd_advantages",
    "rescale_advantages",
    "rollout_mismatch_stats",
    "segment_mean",
    "segment_sum",
    "sequence_gspo_loss",
    "token_ppo_loss",
    "turn_gspo_loss",
    "turn_ratios",
]


# --------------------------------------------------------------------------------------------- segment helpers


def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """``out[s] = sum_{t: index[t] = s} values[t]`` (differentiable in ``values``; empty segments are 0)."""
    return values.new_zeros((num_segments, *values.shape[1:])).index_add(0, index, values)


def segment_mean(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """``out[s] = mean_{t: index[t] = s} values[t]``; 0 for an empty segment.

    E.g. ``H_i = segment_mean(token_entropy, rollout_ids, num_rollouts)`` for :func:`rescale_advantages`.
    """
    count = torch.bincount(index, minlength=num_segments).to(values.dtype)
    return segment_sum(values, index, num_segments) / count.clamp_min(1)


def _dense(ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer ids to ``0..n-1`` (sorted order); returns (dense ids, n)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, uniq.numel()


def _float(x: Tensor, like: Tensor | None = None) -> Tensor:
    if like is not None:
        return x.detach().to(like.dtype)
    return x.detach() if x.is_floating_point() else x.detach().to(torch.get_default_dtype())


# ------------------------------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, use_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO group-relative advantage, one per rollout.

    ``A_i = (R_i - mean_g R) / (std_g R + eps)``, or ``A_i = R_i - mean_g R`` with ``use_std=False``.

    ``std_g`` is the unbiased sample std (divisor ``n_g - 1``), as in GRPO, verl and TRL (``torch.std``). A group
    of size 1 has no baseline to compare with and gets ``A = 0`` (divisor clamped to 1, numerator exactly 0;
    no NaN). A group whose rewards are all equal gets exactly 0. ``group_ids`` may be any integers.
    """
    rewards = _float(rewards)
    gid, n = _dense(group_ids)
    count = torch.bincount(gid, minlength=n).to(rewards.dtype)
    centered = rewards - (segment_sum(rewards, gid, n) / count)[gid]
    hi = rewards.new_full((n,), -torch.inf).scatter_reduce(0, gid, rewards, "amax")
    lo = rewards.new_full((n,), torch.inf).scatter_reduce(0, gid, rewards, "amin")
    centered = centered.masked_fill((hi == lo)[gid], 0.0)
    if not use_std:
        return centered
    var = segment_sum(centered.square(), gid, n) / (count - 1).clamp_min(1)
    return centered / (var.sqrt()[gid] + eps)


def difficulty_factors(difficulty: Tensor, *, lam: float) -> Tensor:
    """Difficulty-aware factor per group (KAT-Coder): ``alpha_g = max(0, 1 + lam (D_g - mean D))``.

    ``D_g = 1 - mean success of group g``; the mean is over the groups of the batch. Harder-than-average groups
    are up-weighted. D = [0.2, 0.8], lam 0.5 -> alpha = [0.85, 1.15].
    """
    difficulty = _float(difficulty)
    return (1.0 + lam * (difficulty - difficulty.mean())).clamp_min(0.0)


def entropy_factors(entropy: Tensor, group_ids: Tensor, *, mu: float) -> Tensor:
    """Entropy-aware factor per rollout (KAT-Coder): ``beta_i = max(0, 1 + mu (H_i - mean_{j in g(i)} H_j))``.

    ``H_i`` is the mean token entropy of rollout i (detached). H = [1, 2, 3] in one group, mu 0.1 ->
    beta = [0.9, 1.0, 1.1].
    """
    entropy = _float(entropy)
    gid, n = _dense(group_ids)
    return (1.0 + mu * (entropy - segment_mean(entropy, gid, n)[gid])).clamp_min(0.0)


def rescale_advantages(
    advantages: Tensor, group_ids: Tensor, success: Tensor, entropy: Tensor, *, lam: float, mu: float
) -> Tensor:
    """Difficulty- and entropy-aware rescaling: ``A'_i = alpha_{g(i)} beta_i A_i``.

    ``success`` (per rollout, bool or in [0, 1]) gives ``D_g = 1 - mean_{i in g} success_i``; ``entropy`` is
    ``H_i`` per rollout. See :func:`difficulty_factors` and :func:`entropy_factors` (both clamped at 0).
    ``lam = mu = 0`` is the identity.
    """
    advantages = _float(advantages)
    gid, n = _dense(group_ids)
    difficulty = 1.0 - segment_mean(_float(success, advantages), gid, n)
    alpha = difficulty_factors(difficulty, lam=lam)[gid]
    return advantages * alpha * entropy_factors(_float(entropy, advantages), group_ids, mu=mu)


def opd_advantages(
    logp_student: Tensor, logp_teacher: Tensor, *, lam: float = 1.0, advantages: Tensor | None = None
) -> Tensor:
    """On-policy distillation, per token: ``A_t += -lam (logp_student(t) - logp_teacher(t))``.

    The teacher scores the student's sampled tokens by prefill (same tokenizer: see
    :func:`check_same_tokenizer`); no discount. Returns ``advantages + term`` (``advantages`` defaults to 0),
    detached; feed it to :func:`token_ppo_loss`. student [-0.5, -1.0, -2.0], teacher [-0.4, -1.5, -2.0]
    -> [0.1, -0.5, 0.0].
    """
    term = -lam * (_float(logp_student) - _float(logp_teacher, logp_student))
    return term if advantages is None else _float(advantages, term) + term


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Refuse (``ValueError``) a distillation teacher whose tokenizer differs from the student's.

    Token-level OPD compares log-probabilities of the same token ids, so the vocabularies (``get_vocab()``,
    added tokens included) and the special tokens (``all_special_tokens`` and the bos/eos/pad/unk ids, where
    the objects have them) must be identical.
    """
    problems: list[str] = []
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = sorted(set(student_vocab) - set(teacher_vocab))
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
        moved = sorted(
            t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t]
        )
        problems.append(
            f"vocabularies differ (student {len(student_vocab)} tokens, teacher {len(teacher_vocab)}; "
            f"only in student {only_student[:5]!r}, only in teacher {only_teacher[:5]!r}, "
            f"different ids {moved[:5]!r})"
        )
    for attr in ("all_special_tokens", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        s, t = getattr(student_tokenizer, attr, None), getattr(teacher_tokenizer, attr, None)
        if attr == "all_special_tokens":
            s, t = sorted(s or []), sorted(t or [])
        if s != t:
            problems.append(f"{attr} differs (student {s!r}, teacher {t!r})")
    if problems:
        raise ValueError(
            "teacher and student must share the tokenizer for on-policy distillation: " + "; ".join(problems)
        )


# ------------------------------------------------------------------------------------ train/rollout mismatch


def icepop_weights(
    logp_old: Tensor, logp_rollout: Tensor, *, alpha: float = 0.5, beta: float = 5.0
) -> Tensor:
    """IcePop token weights (detached): ``k_t = pi_old(t) / pi_rollout(t) = exp(logp_old - logp_rollout)``,
    ``M(k) = k if alpha <= k <= beta else 0``.

    Tokens whose training and serving probabilities disagree too much are dropped; the rest are importance-
    corrected for the training/serving mismatch. k = [0.3, 0.9, 1.2, 6.0] -> M = [0, 0.9, 1.2, 0].
    """
    k = torch.exp(_float(logp_old) - _float(logp_rollout, logp_old))
    return torch.where((k >= alpha) & (k <= beta), k, torch.zeros_like(k))


def rollout_mismatch_stats(
    logp_old: Tensor, logp_rollout: Tensor, *, alpha: float = 0.5, beta: float = 5.0
) -> dict[str, Tensor]:
    """Train/rollout mismatch metrics over the completion tokens (detached 0-d tensors).

    - ``mismatch_abs``: ``mean |logp_old - logp_rollout|``;
    - ``mismatch_kl``: k3 estimate of ``KL(pi_rollout || pi_old)`` (tokens were sampled by the rollout
      engine): ``mean(exp(logp_old - logp_rollout) - (logp_old - logp_rollout) - 1)``;
    - ``icepop_zeroed_frac``: fraction of tokens :func:`icepop_weights` sets to 0.
    """
    logp_old, logp_rollout = _float(logp_old), _float(logp_rollout, logp_old)
    if logp_old.numel() == 0:
        zero = logp_old.new_zeros(())
        return {"mismatch_abs": zero, "mismatch_kl": zero, "icepop_zeroed_frac": zero}
    weights = icepop_weights(logp_old, logp_rollout, alpha=alpha, beta=beta)
    return {
        "mismatch_abs": (logp_old - logp_rollout).abs().mean(),
        "mismatch_kl": kl_to_reference(logp_rollout, logp_old).mean(),
        "icepop_zeroed_frac": (weights == 0).to(logp_old.dtype).mean(),
    }


def mcla_logp_old(passes: Tensor, *, space: Literal["log", "prob"] = "log") -> Tensor:
    """MCLA: ``logp_old`` as the mean of K forward passes of the training model, ``passes`` of shape [K, ...].

    - ``space="log"`` (default): ``logp_old = (1/K) sum_k logp_k`` (mean of log-probabilities);
    - ``space="prob"``: ``logp_old = log((1/K) sum_k exp(logp_k))`` (log of the mean probability).

    With noisy passes (MoE routing, dropout) the variance of the estimate falls about as 1/K. K = 1 returns
    the single pass exactly. Detached.
    """
    if passes.dim() < 1 or passes.shape[0] == 0:
        raise ValueError(
            f"mcla_logp_old needs passes of shape [K, ...] with K >= 1, got {tuple(passes.shape)}"
        )
    passes = passes.detach()
    if passes.shape[0] == 1:
        return passes[0].clone()
    if space == "log":
        return passes.mean(0)
    if space == "prob":
        return torch.logsumexp(passes, 0) - torch.log(passes.new_tensor(float(passes.shape[0])))
    raise ValueError(f"space must be 'log' or 'prob', got {space!r}")


# ------------------------------------------------------------------------------------------------- ratios


def _turn_log_ratios(
    logp: Tensor,
    logp_old: Tensor,
    call_ids: Tensor,
    num_calls: int,
    mode: RatioMode,
    token_weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per call: the clamped log-ratio over the call's kept tokens, and the call weight (see turn_gspo_loss)."""
    if mode not in ("mean", "product"):
        raise ValueError(f"mode must be 'mean' or 'product', got {mode!r}")
    log_ratio = logp - _float(logp_old, logp)
    weights = torch.ones_like(log_ratio) if token_weights is None else _float(token_weights, logp)
    keep = weights > 0
    log_ratio = torch.where(keep, log_ratio, torch.zeros_like(log_ratio))
    total = segment_sum(log_ratio, call_ids, num_calls)
    if mode == "mean":
        total = total / segment_sum(keep.to(logp.dtype), call_ids, num_calls).clamp_min(1)
    call_weight = segment_mean(weights, call_ids, num_calls)  # 0 for a call with no tokens
    return total.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), call_weight


def turn_ratios(
    logp: Tensor,
    logp_old: Tensor,
    call_ids: Tensor,
    num_calls: int,
    *,
    mode: RatioMode = "mean",
    token_weights: Tensor | None = None,
) -> Tensor:
    """Turn-level importance ratio, one per call n.

    - ``mode="mean"`` (default; GSPO's length-normalised geometric mean):
      ``r_n = exp(mean_{t in n} (logp(t) - logp_old(t)))``;
    - ``mode="product"`` (as the KAT-Coder-V2 report writes it): ``r_n = exp(sum_{t in n} (...))``.

    With ``token_weights`` (IcePop), tokens of weight 0 are left out of the mean / sum. A call with no (kept)
    tokens has ratio 1.
    """
    log_r, _ = _turn_log_ratios(logp, logp_old, call_ids, num_calls, mode, token_weights)
    return torch.exp(log_r)


def _clipped_objective(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` and where the clipped branch binds."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    return torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


# ------------------------------------------------------------------------------------------------- losses


def turn_gspo_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    call_ids: Tensor,
    call_rollout: Tensor,
    num_rollouts: int,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    mode: RatioMode = "mean",
    token_weights: Tensor | None = None,
    calls_per_rollout: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Turn-level GSPO (the default loss).

    ``L_i = -(1/N_i) sum_{n in i} w_n min(r_n A_n, clip(r_n, 1 - eps_low, 1 + eps_high) A_n)``,
    ``loss = (1/num_rollouts) sum_i L_i``,

    with ``r_n`` from :func:`turn_ratios` (``mode``), ``A_n = advantages[n]`` (one per call: the rollout's
    ``A_i`` broadcast with ``A_i[call_rollout]`` unless turn rewards exist), ``N_i`` the number of calls of
    rollout i (``calls_per_rollout``, default counted from ``call_rollout``; pass the batch-wide counts when a
    micro-batch holds part of a rollout). ``num_calls = len(call_rollout)``.

    IcePop (``token_weights`` = :func:`icepop_weights`, per token): a token of weight 0 is left out of its
    turn's ratio (it gets no gradient and does not move ``r_n``), and the turn's objective is scaled by
    ``w_n = mean_{t in n} M(k_t)`` (zeros included), which is at once the importance correction (mean k of the
    kept tokens) and the share of the turn that survived. A turn with every token zeroed contributes 0 but still
    counts in ``N_i``. Without ``token_weights``, ``w_n = 1`` (0 for a call with no tokens).

    Gradients reach ``logp`` only; when the clip binds (r above ``1 + eps_high`` with A > 0, or below
    ``1 - eps_low`` with A < 0) the turn gets no gradient.

    stats: ``clip_frac = clipped / clip_units``: the fraction of the active turns (those with a token of weight
    > 0) whose clipped branch binds; ``clipped`` and ``clip_units`` are those counts, so a caller summing them
    over micro-batches gets the same fraction whatever the layout. ``ratio_mean`` (over the active turns),
    ``turn_weight_mean``.
    """
    num_calls = call_rollout.numel()
    log_r, call_weight = _turn_log_ratios(logp, logp_old, call_ids, num_calls, mode, token_weights)
    ratio = torch.exp(log_r)
    objective, binding = _clipped_objective(ratio, _float(advantages, logp), eps_low, eps_high)
    if calls_per_rollout is None:
        calls_per_rollout = torch.bincount(call_rollout, minlength=num_rollouts)
    coef = call_weight / calls_per_rollout.to(logp.dtype)[call_rollout].clamp_min(1)
    loss = -(coef * objective).sum() / max(num_rollouts, 1)

    with torch.no_grad():
        active = call_weight > 0
        clipped = (binding & active).sum().to(logp.dtype)
        units = active.sum().to(logp.dtype)
        n_active = units.clamp_min(1)
        stats = {
            "clip_frac": clipped / n_active,
            "clipped": clipped,
            "clip_units": units,
            "ratio_mean": torch.where(active, ratio, 0.0).sum() / n_active,
            "turn_weight_mean": call_weight.mean() if num_calls else logp.new_zeros(()),
        }
    return loss, stats


def sequence_gspo_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    rollout_ids: Tensor,
    num_rollouts: int,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    mode: RatioMode = "mean",
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sequence-level GSPO (the GSPO paper): one ratio per rollout over all its completion tokens.

    ``s_i = exp(mean_{t in i} (logp(t) - logp_old(t)))``,
    ``loss = -(1/num_rollouts) sum_i w_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``,

    ``advantages`` one per rollout. This is :func:`turn_gspo_loss` with each rollout as a single turn (same
    ``mode`` and IcePop handling, ``w_i`` the mean token weight, and stats: ``clip_frac`` is over rollouts). The
    ratio is not additive over tokens, so all of a rollout's tokens must be in the same call.
    """
    return turn_gspo_loss(
        logp,
        logp_old,
        advantages,
        rollout_ids,
        torch.arange(num_rollouts, device=rollout_ids.device),
        num_rollouts,
        eps_low=eps_low,
        eps_high=eps_high,
        mode=mode,
        token_weights=token_weights,
        calls_per_rollout=torch.ones(num_rollouts, dtype=torch.long, device=rollout_ids.device),
    )


def token_ppo_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    rollout_ids: Tensor,
    num_rollouts: int,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: TokenAgg = "token-mean",
    token_weights: Tensor | None = None,
    tokens_per_rollout: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO / GRPO clipped surrogate (clip-higher defaults of DAPO).

    ``r_t = exp(logp(t) - logp_old(t))``, ``l_t = -w_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)``;
    ``advantages`` per token (``A_i[rollout_ids]``, plus :func:`opd_advantages` terms for distillation),
    ``w_t`` the IcePop weights (default 1). Aggregation:

    - ``agg="token-mean"`` (default, verl's default and DAPO's): ``loss = (1/T) sum_t l_t`` over the T tokens of
      the call (zeroed tokens included in T). For micro-batches scale by ``T / T_batch``.
    - ``agg="seq-mean-token-mean"`` (GRPO paper): mean over each rollout's tokens, then sum over rollouts
      divided by ``num_rollouts``; ``tokens_per_rollout`` gives batch-wide token counts for split rollouts.

    stats: ``clip_frac = clipped / clip_units``: the fraction of the kept tokens (weight > 0; all of them without
    ``token_weights``) whose clipped branch binds, a token IcePop zeroed being neither trained nor clipped;
    ``clipped`` and ``clip_units`` are those counts (sum them over micro-batches for a step's fraction).
    ``ratio_mean`` (over all tokens).
    """
    log_ratio = (logp - _float(logp_old, logp)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    objective, binding = _clipped_objective(ratio, _float(advantages, logp), eps_low, eps_high)
    per_token = -objective if token_weights is None else -objective * _float(token_weights, logp)
    if agg == "token-mean":
        loss = per_token.sum() / max(per_token.numel(), 1)
    elif agg == "seq-mean-token-mean":
        if tokens_per_rollout is None:
            tokens_per_rollout = torch.bincount(rollout_ids, minlength=num_rollouts)
        loss = (per_token / tokens_per_rollout.to(logp.dtype)[rollout_ids].clamp_min(1)).sum() / max(
            num_rollouts, 1
        )
    else:
        raise ValueError(f"agg must be 'token-mean' or 'seq-mean-token-mean', got {agg!r}")
    with torch.no_grad():
        n = max(ratio.numel(), 1)
        kept = torch.ones_like(binding) if token_weights is None else _float(token_weights, logp) > 0
        clipped, units = (binding & kept).sum().to(logp.dtype), kept.sum().to(logp.dtype)
        stats = {"clip_frac": clipped / units.clamp_min(1), "clipped": clipped, "clip_units": units,
                 "ratio_mean": ratio.sum() / n}
    return loss, stats


def kl_to_reference(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token k3 estimator of ``KL(pi_theta || pi_ref)`` on tokens sampled from pi_theta (Schulman):

    ``k3_t = exp(d_t) - d_t - 1`` with ``d_t = logp_ref(t) - logp(t)`` (clamped to [-20, 20]).

    Unbiased, always >= 0, zero where the two agree; gradients reach ``logp`` only. Aggregate it as the policy
    loss is aggregated and add ``beta_kl * kl`` to the loss.
    """
    d = (_float(logp_ref, logp) - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def masked_sft_loss(logp: Tensor, mask: Tensor) -> Tensor:
    """Error-masked SFT: ``loss = -sum_t m_t logp(t) / sum_t m_t``, the mean NLL over tokens with mask 1.

    The mask is 0 on the tokens of failed tool calls (and on anything else not to imitate). An all-zero mask
    gives a loss of 0 (with a graph, zero gradient).
    """
    keep = mask.detach().bool()
    nll = torch.where(keep, -logp, torch.zeros_like(logp))
    return nll.sum() / keep.sum().clamp_min(1).to(logp.dtype)
