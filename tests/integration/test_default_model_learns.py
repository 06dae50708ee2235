"""Learning happens with the default model on the CPU: a verifiable toy task.

The reward is 1 when the answer is exactly the word "No" to "Is the sky green? Answer with one
word: yes or no." SmolLM2-135M-Instruct starts well below 0.5 (it mostly rambles or says yes).
Each step samples a group of answers from the current weights (recording their sampling
logprobs), rewards them and takes one turn-level GSPO step; the mean reward must pass 0.9
within the step budget. On the torch backend (one process) and on the fsdp and megatron backends
(2 gloo ranks started by arborl, sampling from the weights gathered after each step, as serving
would).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from arborl.learner.backends import BackendSpec
from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.packing import CallSpan
from arborl.learner.settings import LearnerSettings
from arborl.learner.train_step import RolloutSample, StepConfig
from arborl.learner.trainer import Trainer, open_trainer
from arborl.rollout.trie import Trie

QUESTION = "Is the sky green? Answer with one word: yes or no."
GROUP, MAX_STEPS = 16, 40


def _reward(answer: str) -> float:
    return float(answer.strip().rstrip(".!").lower() == "no")


@torch.no_grad()
def _sample(model, tokenizer, prompt: list[int]) -> list[tuple[list[int], torch.Tensor]]:
    """GROUP answers (up to and including EOS) with the logprob of each sampled token."""
    model.set_attn_implementation("sdpa")  # the training step leaves tree attention set
    ids = torch.tensor([prompt] * GROUP)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                         top_k=0, max_new_tokens=4, return_dict_in_generate=True, output_scores=True,
                         pad_token_id=tokenizer.eos_token_id)
    logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)  # [G, steps, V]
    samples = []
    for row, logp in zip(out.sequences[:, len(prompt):].tolist(), logps, strict=True):
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        tokens = row[:end]
        samples.append((tokens, logp[torch.arange(len(tokens)), torch.tensor(tokens)]))
    return samples


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "torch", "fsdp",
    pytest.param("megatron", marks=pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                                      reason="no megatron-core")),
])
def test_default_model_learns_a_verifiable_toy_task(backend: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model

    folder = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if backend == "torch":
        trainer = Trainer(TorchBackend(model, torch.optim.AdamW(model.parameters(), lr=2e-5)))
    else:  # the same AdamW (torch's default weight decay), on 2 ranks; ``model`` only samples.
        # (megatron: data parallel 2; the default model's 3 KV heads do not split over 2 TP ranks)
        settings = LearnerSettings(backend=backend, nproc=2, lr=2e-5, weight_decay=0.01)
        trainer = open_trainer(BackendSpec(weights=folder, settings=settings))
    try:
        rewards = _learn(model, tokenizer, trainer, publish=backend != "torch")
    finally:
        trainer.close()
    assert rewards[0] < 0.5, rewards
    assert sum(rewards[-3:]) / 3 > 0.9, rewards


def _learn(model, tokenizer, trainer, *, publish: bool) -> list[float]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    rewards = []
    for step in range(MAX_STEPS):
        group = []
        for i, (tokens, logp) in enumerate(_sample(model, tokenizer, prompt)):
            trie = Trie()
            call = CallSpan((step, i), trie.insert(prompt + tokens).leaf, len(tokens))
            reward = _reward(tokenizer.decode(tokens, skip_special_tokens=True))
            group.append(RolloutSample(trie, [call], reward, group=0, logp_rollout={call.key: logp}))
        metrics = trainer.train(group, StepConfig())
        if publish:  # the trained weights into the sampling copy
            model.load_state_dict(trainer.full_state_dict())
        rewards.append(metrics["reward_mean"])
        print(f"step {step}: mean reward {rewards[-1]:.2f}, mismatch {metrics.get('mismatch_abs', 0):.4f}")
        if len(rewards) >= 3 and sum(rewards[-3:]) / 3 > 0.9:
            break
    return rewards
