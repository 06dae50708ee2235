"""The training step learns: a tiny model rewarded for writing one token writes it more and more.

Each step samples a group of completions for one prompt from the current model (recording the
sampling logprobs, as the gateway does), rewards the share of completion tokens that are the
target token, and takes one turn-level GSPO step on the group's trie.
"""

from __future__ import annotations

import pytest
import torch

from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.packing import CallSpan
from arborl.learner.train_step import RolloutSample, StepConfig, train_step
from arborl.rollout.trie import Trie
from learner_fixtures import one_torch_thread  # noqa: F401 - the fixture, used below

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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
        metrics = train_step(TorchBackend(model, optimizer), _group(model, step, generator), StepConfig())
        rewards.append(metrics["reward_mean"])
        assert metrics["mismatch_abs"] < 1e-4  # sampled and trained with the same weights
    print("mean reward per step:", [round(r, 2) for r in rewards])
    assert sum(rewards[:3]) / 3 < 0.1  # chance is 1/61
    assert sum(rewards[-5:]) / 5 > 0.9


def test_skipping_the_old_pass_changes_nothing(monkeypatch):
    """With one deterministic pass, logp_old is the training forward's own logp: the step that
    skips the old pass ends with the same weights and metrics as the one that runs it."""
    from arborl.learner import train_step as module

    assert not module.old_pass_needed(TorchBackend(_model().train()), StepConfig())
    generator = torch.Generator().manual_seed(3)
    start = _model().double().train()
    rollouts = _group(start, 0, generator)
    results = []
    for needed in (True, False):
        model = _model().double().train()
        model.load_state_dict(start.state_dict())
        monkeypatch.setattr(module, "old_pass_needed", lambda backend, config, needed=needed: needed)
        # difficulty rescaling on (it runs without the old pass), KL off; IcePop sees the recorded logprobs
        metrics = train_step(TorchBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-2)), rollouts,
                             StepConfig(difficulty_lambda=0.5))
        results.append((metrics, {name: p.detach().clone() for name, p in model.named_parameters()}))
    (with_pass, weights_with), (without_pass, weights_without) = results
    for key in ("loss", "clip_frac", "grad_norm", "entropy", "mismatch_abs", "mismatch_kl", "icepop_zeroed_frac"):
        assert abs(with_pass[key] - without_pass[key]) <= 1e-9 * max(abs(with_pass[key]), 1.0), key
    assert with_pass["grad_norm"] > 0
    for name, weight in weights_with.items():
        torch.testing.assert_close(weights_without[name], weight, rtol=1e-12, atol=1e-12)


def test_which_steps_need_an_old_pass():
    from transformers import LlamaConfig, LlamaForCausalLM

    from arborl.learner.backends.hf_model import forward_is_deterministic
    from arborl.learner.train_step import old_pass_needed

    plain = _model().train()
    assert forward_is_deterministic(plain)
    assert old_pass_needed(TorchBackend(plain), StepConfig(mcla_passes=8))  # MCLA averages K passes
    assert old_pass_needed(TorchBackend(plain), StepConfig(entropy_mu=0.1))  # needs entropies before the first loss
    noisy = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1))
    assert not forward_is_deterministic(noisy.train()) and old_pass_needed(TorchBackend(noisy), StepConfig())
    assert forward_is_deterministic(noisy.eval())  # dropout is off in eval mode
    plain.model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.1))
    assert not forward_is_deterministic(plain.train())
