"""Losses and advantages of the learner: every worked number of DESIGN.md section 5, plus hand-computed GSPO."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from arborl.learner.core_algos import (
    check_same_tokenizer,
    difficulty_factors,
    entropy_factors,
    group_advantages,
    icepop_weights,
    kl_to_reference,
    masked_sft_loss,
    mcla_logp_old,
    opd_advantages,
    rescale_advantages,
    rollout_mismatch_stats,
    segment_mean,
    sequence_gspo_loss,
    token_ppo_loss,
    turn_gspo_loss,
    turn_ratios,
)

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ------------------------------------------------------------------------------------ group advantages


def test_group_advantages_sample_std() -> None:
    rewards = t(1.0, 0.0, 0.0, 1.0, 1.0, 0.5)
    groups = ids(7, 7, 7, 3, 3, 3)  # arbitrary, non-contiguous ids
    adv = group_advantages(rewards, groups, eps=0.0)
    # group 7: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s7 = math.sqrt(1 / 3)
    # group 3: mean 5/6, sample std sqrt(((1/6)^2 * 2 + (1/3)^2) / 2) = sqrt(1/12)
    s3 = math.sqrt(1 / 12)
    expected = t((2 / 3) / s7, (-1 / 3) / s7, (-1 / 3) / s7, (1 / 6) / s3, (1 / 6) / s3, (-1 / 3) / s3)
    assert_close(adv, expected)
    assert_close(adv, (rewards - rewards.view(2, 3).mean(1).repeat_interleave(3)) / _torch_std(rewards))


def _torch_std(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.view(2, 3).std(1).repeat_interleave(3)  # torch.std is the unbiased (sample) std


def test_group_advantages_without_std_and_degenerate_groups() -> None:
    rewards = t(1.0, 0.0, 0.0, 0.7, 0.1, 0.1, 0.1)
    groups = ids(0, 0, 0, 1, 2, 2, 2)  # group 1 has one rollout, group 2 all-equal rewards
    assert_close(group_advantages(rewards, groups, use_std=False), t(2 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0))
    adv = group_advantages(rewards, groups)
    assert torch.isfinite(adv).all()
    assert adv[3:].eq(0).all()  # size 1 and constant groups: exactly 0, no NaN
    assert_close(group_advantages(t(5.0), ids(0)), t(0.0))
    assert_close(
        group_advantages(torch.tensor([1, 0]), ids(0, 0), eps=0.0), torch.tensor([0.7071068, -0.7071068])
    )


# ------------------------------------------------------------------------------------------- rescaling


def test_rescaling_worked_numbers() -> None:
    assert_close(difficulty_factors(t(0.2, 0.8), lam=0.5), t(0.85, 1.15))
    assert_close(entropy_factors(t(1.0, 2.0, 3.0), ids(0, 0, 0), mu=0.1), t(0.9, 1.0, 1.1))
    # entropy centred per group, not over the batch
    assert_close(entropy_factors(t(1.0, 3.0, 10.0, 20.0), ids(0, 0, 1, 1), mu=0.1), t(0.9, 1.1, 0.5, 1.5))


def test_rescale_advantages_combines_and_clamps() -> None:
    adv = t(1.0, -1.0, 2.0, -2.0)
    groups = ids(0, 0, 1, 1)
    success = torch.tensor([True, True, True, False])  # D = [0.0, 0.5], mean 0.25
    entropy = t(1.0, 3.0, 2.0, 2.0)
    out = rescale_advantages(adv, groups, success, entropy, lam=2.0, mu=0.1)
    alpha = t(0.5, 0.5, 1.5, 1.5)  # 1 + 2 (D - 0.25)
    beta = t(0.9, 1.1, 1.0, 1.0)
    assert_close(out, adv * alpha * beta)
    assert_close(rescale_advantages(adv, groups, success, entropy, lam=0.0, mu=0.0), adv)
    # clamp at 0: alpha = 1 + 5 (D - 0.25) = -0.25 for the easy group; beta = 1 + 2 (H - 2) = -1 for H = 1
    assert_close(difficulty_factors(t(0.0, 0.5), lam=5.0), t(0.0, 2.25))
    assert_close(entropy_factors(t(1.0, 3.0), ids(0, 0), mu=2.0), t(0.0, 3.0))
    out = rescale_advantages(adv, groups, success, entropy, lam=5.0, mu=2.0)
    assert_close(out, t(0.0, -0.0, 2.0 * 2.25, -2.0 * 2.25))


def test_segment_mean_gives_rollout_entropy() -> None:
    token_entropy = t(1.0, 3.0, 5.0, 7.0)
    assert_close(segment_mean(token_entropy, ids(0, 0, 2, 2), 3), t(2.0, 0.0, 6.0))


# ---------------------------------------------------------------------------------------------- IcePop


def test_icepop_worked_numbers() -> None:
    k = t(0.3, 0.9, 1.2, 6.0)
    logp_rollout = t(-1.0, -2.0, -0.5, -3.0)
    logp_old = (logp_rollout + k.log()).requires_grad_()
    weights = icepop_weights(logp_old, logp_rollout)
    assert_close(weights, t(0.0, 0.9, 1.2, 0.0))
    assert not weights.requires_grad
    assert_close(icepop_weights(t(math.log(0.5), math.log(5.0)), t(0.0, 0.0)), t(0.5, 5.0))  # bounds included
    stats = rollout_mismatch_stats(logp_old, logp_rollout)
    assert_close(stats["icepop_zeroed_frac"], torch.tensor(0.5, dtype=F64))
    assert_close(stats["mismatch_abs"], k.log().abs().mean())
    assert_close(stats["mismatch_kl"], (k - k.log() - 1).mean())


# ------------------------------------------------------------------------------------ GSPO, hand computed

# Two rollouts, three turns: rollout 0 made turns 0 (2 tokens) and 1 (3 tokens), rollout 1 made turn 2 (1 token).
CALL_IDS = ids(0, 0, 1, 1, 1, 2)
CALL_ROLLOUT = ids(0, 0, 1)
DELTA = t(1e-4, 3e-4, -1e-3, -2e-3, 0.0, -1e-3)  # logp - logp_old per token
ADV = t(1.0, 1.0, -1.0)  # A_i broadcast to calls: rollout 0 +1, rollout 1 -1


def _gspo_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    logp_old = t(-1.0, -2.0, -0.5, -1.5, -3.0, -0.7).requires_grad_()
    logp = (logp_old.detach() + DELTA).requires_grad_()
    return logp, logp_old


def test_turn_ratios_mean_and_product() -> None:
    logp, logp_old = _gspo_inputs()
    mean = turn_ratios(logp, logp_old, CALL_IDS, 3)
    assert_close(mean, t(math.exp(2e-4), math.exp(-1e-3), math.exp(-1e-3)))
    product = turn_ratios(logp, logp_old, CALL_IDS, 3, mode="product")
    assert_close(product, t(math.exp(4e-4), math.exp(-3e-3), math.exp(-1e-3)))
    with pytest.raises(ValueError, match="mode"):
        turn_ratios(logp, logp_old, CALL_IDS, 3, mode="sum")  # type: ignore[arg-type]


def test_turn_gspo_mean_mode_hand_computed() -> None:
    logp, logp_old = _gspo_inputs()
    loss, stats = turn_gspo_loss(logp, logp_old, ADV, CALL_IDS, CALL_ROLLOUT, 2)
    r0, r1 = math.exp(2e-4), math.exp(-1e-3)
    # turn 0 inside [1 - 3e-4, 1 + 4e-4]; turn 1 below it but A > 0 so min keeps r1 (not binding);
    # turn 2: r = exp(-1e-3) < 0.9997 with A < 0: min(-r, -0.9997) = -0.9997, the clip binds.
    l_0 = -(r0 + r1) / 2
    l_1 = 0.9997
    assert_close(loss, torch.tensor((l_0 + l_1) / 2, dtype=F64))
    assert_close(stats["clip_frac"], torch.tensor(1 / 3, dtype=F64))
    loss.backward()
    # d loss / d logp_t = -(1/2 rollouts)(1/N_0 = 1/2) A r_n / |n|
    expected = t(-r0 / 8, -r0 / 8, -r1 / 12, -r1 / 12, -r1 / 12, 0.0)
    assert_close(logp.grad, expected)
    assert logp_old.grad is None  # gradients reach logp only


def test_turn_gspo_product_mode_hand_computed() -> None:
    logp, logp_old = _gspo_inputs()
    loss, stats = turn_gspo_loss(logp, logp_old, ADV, CALL_IDS, CALL_ROLLOUT, 2, mode="product")
    # turn 0: exp(4e-4) = 1.00040008 > 1.0004 with A > 0: the high clip binds (the mean mode did not clip it)
    r1 = math.exp(-3e-3)
    assert math.exp(4e-4) > 1 + 4e-4
    l_0 = -(1.0004 + r1) / 2
    assert_close(loss, torch.tensor((l_0 + 0.9997) / 2, dtype=F64))
    assert_close(stats["clip_frac"], torch.tensor(2 / 3, dtype=F64))
    loss.backward()
    assert_close(logp.grad, t(0.0, 0.0, -r1 / 4, -r1 / 4, -r1 / 4, 0.0))  # clipped turns get no gradient


def test_turn_gspo_with_icepop_weights() -> None:
    logp, logp_old = _gspo_inputs()
    # turn 0 keeps token 1 only (weight 1.2), turn 1 keeps all (weights 1, 1, 1), turn 2 is zeroed
    weights = t(0.0, 1.2, 1.0, 1.0, 1.0, 0.0)
    ratios = turn_ratios(logp, logp_old, CALL_IDS, 3, token_weights=weights)
    assert_close(ratios, t(math.exp(3e-4), math.exp(-1e-3), 1.0))
    loss, stats = turn_gspo_loss(logp, logp_old, ADV, CALL_IDS, CALL_ROLLOUT, 2, token_weights=weights)
    r0, r1 = math.exp(3e-4), math.exp(-1e-3)
    w0 = 0.6  # mean weight of turn 0
    # rollout 1's only turn is zeroed: it contributes 0, but rollouts still count 2 in the mean
    assert_close(loss, torch.tensor(-(w0 * r0 + r1) / 2 / 2, dtype=F64))
    assert_close(stats["turn_weight_mean"], torch.tensor((0.6 + 1.0 + 0.0) / 3, dtype=F64))
    assert_close(stats["clip_frac"], torch.tensor(0.0, dtype=F64))
    loss.backward()
    assert_close(logp.grad, t(0.0, -w0 * r0 / 4, -r1 / 12, -r1 / 12, -r1 / 12, 0.0))
    assert torch.isfinite(logp.grad).all()


def test_turn_gspo_split_micro_batches_sum_to_the_batch() -> None:
    logp, logp_old = _gspo_inputs()
    whole, _ = turn_gspo_loss(logp, logp_old, ADV, CALL_IDS, CALL_ROLLOUT, 2)
    calls_per_rollout = ids(2, 1)
    first, _ = turn_gspo_loss(
        logp[:2], logp_old[:2], ADV[:1], ids(0, 0), ids(0), 2, calls_per_rollout=calls_per_rollout
    )
    rest, _ = turn_gspo_loss(
        logp[2:], logp_old[2:], ADV[1:], ids(0, 0, 0, 1), ids(0, 1), 2, calls_per_rollout=calls_per_rollout
    )
    assert_close(first + rest, whole)


def test_sequence_gspo_one_ratio_per_rollout() -> None:
    logp, logp_old = _gspo_inputs()
    rollout_ids = CALL_ROLLOUT[CALL_IDS]
    loss, stats = sequence_gspo_loss(logp, logp_old, t(1.0, -1.0), rollout_ids, 2)
    s0 = math.exp(sum([1e-4, 3e-4, -1e-3, -2e-3, 0.0]) / 5)  # 0.99948, below the range, A > 0: unclipped
    assert_close(loss, torch.tensor((-s0 + 0.9997) / 2, dtype=F64))
    assert_close(stats["clip_frac"], torch.tensor(0.5, dtype=F64))
    loss.backward()
    assert_close(logp.grad, t(*([-s0 / 10] * 5), 0.0))
    assert logp_old.grad is None


def test_token_ppo_loss_aggregations() -> None:
    logp_old = t(-1.0, -1.0, -1.0, -1.0).requires_grad_()
    logp = (logp_old.detach() + t(0.5, -0.5, 0.1, 0.0)).requires_grad_()
    adv = t(1.0, 1.0, 1.0, -2.0)
    rollout_ids = ids(0, 0, 0, 1)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1), 1.0]
    # token 0 clipped at 1.28 (A > 0, binds); token 1 below 0.8 but A > 0: unclipped
    obj = [1.28, r[1], r[2], -2.0]
    loss, stats = token_ppo_loss(logp, logp_old, adv, rollout_ids, 2)
    assert_close(loss, torch.tensor(-sum(obj) / 4, dtype=F64))
    assert_close(stats["clip_frac"], torch.tensor(0.25, dtype=F64))
    loss.backward()
    assert_close(logp.grad, t(0.0, -r[1] / 4, -r[2] / 4, 2.0 / 4))
    assert logp_old.grad is None

    loss, _ = token_ppo_loss(logp, logp_old, adv, rollout_ids, 2, agg="seq-mean-token-mean")
    assert_close(loss, torch.tensor((-(obj[0] + obj[1] + obj[2]) / 3 + 2.0) / 2, dtype=F64))
    weights = t(0.0, 0.9, 1.2, 1.0)
    loss, _ = token_ppo_loss(logp, logp_old, adv, rollout_ids, 2, token_weights=weights)
    assert_close(loss, torch.tensor(-(0.9 * obj[1] + 1.2 * obj[2] + obj[3]) / 4, dtype=F64))


# ------------------------------------------------------------------------------------------ distillation


def test_opd_worked_numbers() -> None:
    student = t(-0.5, -1.0, -2.0).requires_grad_()
    teacher = t(-0.4, -1.5, -2.0)
    adv = opd_advantages(student, teacher)
    assert_close(adv, t(0.1, -0.5, 0.0))
    assert not adv.requires_grad
    assert_close(opd_advantages(student, teacher, lam=2.0, advantages=t(1.0, 1.0, 1.0)), t(1.2, 0.0, 1.0))


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int], eos_token_id: int | None = None):
        self._vocab = vocab
        self.eos_token_id = eos_token_id

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


def test_opd_refuses_a_teacher_with_another_tokenizer() -> None:
    vocab = {"a": 0, "b": 1, "<eos>": 2}
    check_same_tokenizer(FakeTokenizer(vocab, 2), FakeTokenizer(dict(vocab), 2))
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_same_tokenizer(FakeTokenizer(vocab, 2), FakeTokenizer({"a": 0, "c": 1, "<eos>": 2}, 2))
    with pytest.raises(ValueError, match="different ids \\['a', 'b'\\]"):
        check_same_tokenizer(FakeTokenizer(vocab, 2), FakeTokenizer({"a": 1, "b": 0, "<eos>": 2}, 2))
    with pytest.raises(ValueError, match="eos_token_id differs"):
        check_same_tokenizer(FakeTokenizer(vocab, 2), FakeTokenizer(vocab, 1))


# ------------------------------------------------------------------------------------------------- MCLA


def test_mcla_single_pass_is_the_baseline_exactly() -> None:
    base = torch.randn(7, dtype=F64) - 2.0
    for space in ("log", "prob"):
        out = mcla_logp_old(base[None], space=space)
        assert torch.equal(out, base)


def test_mcla_log_versus_probability_space() -> None:
    passes = torch.log(t(0.2, 0.4, 0.6, 0.4).view(2, 2))  # token 0: p = 0.2 and 0.6; token 1: 0.4 twice
    assert_close(mcla_logp_old(passes), t(0.5 * math.log(0.12), math.log(0.4)))
    assert_close(mcla_logp_old(passes, space="prob"), t(math.log(0.4), math.log(0.4)))
    with pytest.raises(ValueError):
        mcla_logp_old(passes, space="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mcla_logp_old(passes[:0])


def test_mcla_variance_falls_as_one_over_k() -> None:
    gen = torch.Generator().manual_seed(0)
    draws, k, sigma = 4000, 8, 0.1
    noisy = -1.0 + sigma * torch.randn(draws, k, 1, generator=gen, dtype=F64)
    estimates = torch.stack([mcla_logp_old(d) for d in noisy])
    assert abs(estimates.var().item() / (sigma**2 / k) - 1) < 0.1


# --------------------------------------------------------------------------------------------- KL and SFT


def test_kl_to_reference_k3() -> None:
    logp = t(math.log(0.5), -1.0).requires_grad_()
    logp_ref = t(math.log(0.25), -1.0)
    kl = kl_to_reference(logp, logp_ref)
    assert_close(kl, t(0.5 + math.log(2) - 1, 0.0))
    kl.sum().backward()
    assert_close(logp.grad, t(1 - 0.5, 0.0))  # d/dlogp (e^d - d - 1) = 1 - e^d


def test_masked_sft_loss() -> None:
    logp = t(-1.0, -2.0, -float("inf"), -3.0).requires_grad_()
    mask = ids(1, 0, 0, 1)  # tokens 1 and 2 belong to failed tool calls
    loss = masked_sft_loss(logp, mask)
    assert_close(loss, torch.tensor(2.0, dtype=F64))
    loss.backward()
    assert_close(logp.grad, t(-0.5, 0.0, 0.0, -0.5))
    empty = masked_sft_loss(t(-1.0, -2.0).requires_grad_(), ids(0, 0))
    assert empty.item() == 0.0 and empty.requires_grad
