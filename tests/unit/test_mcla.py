"""MCLA on a real (tiny) model: K = 1 is the baseline pass; with dropout on, K passes cut the
variance of the logp_old estimate close to 1/K."""

from __future__ import annotations

import random

import torch

from arborl.learner.logp_old import estimate_logp_old
from arborl.learner.packing import CallSpan, pack
from arborl.learner.tree_forward import packed_token_logprobs
from arborl.rollout.trie import Trie


def _noisy_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    return LlamaForCausalLM(config).train()  # dropout on: every forward is a different draw


def _batch():
    rng = random.Random(0)
    prompt = [rng.randrange(61) for _ in range(12)]
    trie = Trie()
    calls = []
    for i in range(3):
        completion = [rng.randrange(61) for _ in range(6)]
        calls.append(CallSpan(i, trie.insert(prompt + completion).leaf, len(completion)))
    return pack([(trie, calls)])


def test_one_pass_is_the_baseline_exactly():
    model, batch = _noisy_model(), _batch()
    torch.manual_seed(5)
    with torch.no_grad():
        baseline = packed_token_logprobs(model, batch)
    torch.manual_seed(5)
    estimate = estimate_logp_old(model, batch, passes=1)
    assert torch.equal(estimate.isnan(), baseline.isnan())
    assert torch.equal(estimate.nan_to_num(), baseline.nan_to_num())


def test_variance_falls_as_one_over_k():
    model, batch = _noisy_model(), _batch()
    tokens = batch.parent >= 0
    torch.manual_seed(1)
    draws = {k: torch.stack([estimate_logp_old(model, batch, passes=k)[tokens] for _ in range(120)]) for k in (1, 8)}
    ratio = (draws[8].var(0) / draws[1].var(0)).mean().item()  # per token, averaged over tokens
    print(f"variance ratio K=8 vs K=1: {ratio:.4f} (1/K = 0.125)")
    assert 0.8 / 8 < ratio < 1.25 / 8, ratio
