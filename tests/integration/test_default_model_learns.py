"""Learning happens with the default model on the CPU: a verifiable toy task.

The reward is 1 when the answer is exactly the word "No" to "Is the sky green? Answer with one
word: yes or no." SmolLM2-135M-Instruct starts well below 0.5 (it mostly rambles or says yes).
Each step samples a group of answers from the current weights (recording their sampling
logprobs), rewards them and takes one turn-level GSPO step; the mean reward must pass 0.9
within the step budget.
"""

from __future__ import annotations

import pytest
import torch

from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.packing import CallSpan
from arborl.learner.train_step import RolloutSample, StepConfig, train_step
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
def test_default_model_learns_a_verifiable_toy_task():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model

    folder = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
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
        metrics = train_step(TorchBackend(model, optimizer), group, StepConfig())
        rewards.append(metrics["reward_mean"])
        print(f"step {step}: mean reward {rewards[-1]:.2f}, mismatch {metrics.get('mismatch_abs', 0):.4f}")
        if len(rewards) >= 3 and sum(rewards[-3:]) / 3 > 0.9:
            break
    assert rewards[0] < 0.5, rewards
    assert sum(rewards[-3:]) / 3 > 0.9, rewards
