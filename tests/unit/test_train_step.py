"""The training step learns: a tiny model rewarded for writing one token writes it more and more.

Each step samples a group of completions for one prompt from the current model (recording the
sampling logprobs, as the gateway does), rewards the share of completion tokens that are the
target token, and takes one turn-level GSPO step on the group's trie.
"""

from __future__ import annotations

import torch

from arborl.learner.packing import CallSpan
from arborl.learner.train_step import RolloutSample, StepConfig, train_step
from arborl.rollout.trie import Trie

VOCAB, TARGET, PROMPT = 61, 7, [3, 14, 15, 9, 26]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


@torch.no_grad()
def _sample(model, group: int, length: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``group`` completions and the logprob of each sampled token (temperature 1)."""
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([PROMPT] * group)
    logps = []
    for _ in range(length):
        logits = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
        token = torch.multinomial(logits.exp(), 1, generator=generator)
        logps.append(logits.gather(-1, token))
        ids = torch.cat([ids, token], dim=1)
    return ids[:, len(PROMPT):], torch.cat(logps, dim=1)


def _group(model, step: int, generator) -> list[RolloutSample]:
    completions, logps = _sample(model, 8, 6, generator)
    rollouts = []
    for i, (completion, logp) in enumerate(zip(completions.tolist(), logps, strict=True)):
        trie = Trie()
        call = CallSpan(("call", step, i), trie.insert(PROMPT + completion).leaf, len(completion))
        reward = sum(token == TARGET for token in completion) / len(completion)
        rollouts.append(RolloutSample(trie, [call], reward, group=0, logp_rollout={call.key: logp}))
    return rollouts


def test_reward_rises_from_chance():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    rewards = []
    for step in range(30):
        metrics = train_step(model, optimizer, _group(model, step, generator), StepConfig())
        rewards.append(metrics["reward_mean"])
        assert metrics["mismatch_abs"] < 1e-4  # sampled and trained with the same weights
    print("mean reward per step:", [round(r, 2) for r in rewards])
    assert sum(rewards[:3]) / 3 < 0.1  # chance is 1/61
    assert sum(rewards[-5:]) / 5 > 0.9
