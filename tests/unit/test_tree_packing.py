"""Tree packing (DESIGN section 4): the flattening contract, splitting, and the core invariant.

The core invariant: on a float64 Llama-family model, the packed loss and every parameter
gradient equal those of running each call separately, to 1e-9 relative, for tries shaped like
agent traffic (branches at several depths, G rollouts sharing a long prompt, a compaction-style
branch, rollouts that sampled identical first tokens).
"""

from __future__ import annotations

import random

import pytest
import torch

from arborl.kernels import tree_attention
from arborl.kernels.tree_attention import BLOCKS, FLEX, SDPA, VARLEN, tree_mask
from arborl.learner.packing import CallSpan, pack, packing_stats, split_by_budget
from arborl.learner.tree_forward import packed_token_logprobs
from arborl.rollout.trie import Trie
from learner_fixtures import one_torch_thread  # noqa: F401 - the fixture, used below

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 61


def _trie(paths: list[tuple[list[int], int]]) -> tuple[Trie, list[CallSpan]]:
    """A trie of the given (path, completion length) calls."""
    trie = Trie()
    calls = [CallSpan(i, trie.insert(path).leaf, completion) for i, (path, completion) in enumerate(paths)]
    return trie, calls


def test_worked_flattening_example():
    a, b, c, d, e = 1, 2, 3, 4, 5
    trie, calls = _trie([([a, b, c, d], 2), ([a, b, e], 1)])
    batch = pack([(trie, calls)])
    assert batch.input_ids.tolist() == [a, b, c, d, e]
    assert batch.parent.tolist() == [-1, 0, 1, 2, 1]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 2]
    assert batch.end.tolist() == [4, 4, 3, 3, 4]
    assert tree_mask(batch.end)[4].int().tolist() == [1, 1, 0, 0, 1]
    assert batch.completion_index[0].tolist() == [2, 3] and batch.completion_index[1].tolist() == [4]


def _agent_shaped(rng: random.Random, *, rollouts: int = 3, prompt: int = 20) -> list[tuple[list[int], int]]:
    """G rollouts sharing a prompt, a few turns each, tool outputs between turns, one compaction
    branch, and two rollouts whose first sampled tokens are identical."""
    shared = [rng.randrange(VOCAB) for _ in range(prompt)]
    first = [rng.randrange(VOCAB) for _ in range(3)]
    paths = []
    for r in range(rollouts):
        context = list(shared)
        for turn in range(rng.randint(2, 3)):
            completion = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 5))]
            if turn == 0 and r < 2:
                completion = first + completion  # identical first tokens, then they part
            paths.append((context + completion, len(completion)))
            context = context + completion + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
        if r == 0:  # compaction: the history is replaced by a summary after the system prompt
            summary = shared[:5] + [rng.randrange(VOCAB) for _ in range(6)]
            completion = [rng.randrange(VOCAB) for _ in range(3)]
            paths.append((summary + completion, len(completion)))
    return paths


@pytest.mark.parametrize("seed", range(20))
def test_flattening_contract_on_random_tries(seed: int):
    rng = random.Random(seed)
    paths = _agent_shaped(rng, rollouts=rng.randint(1, 4))
    trie, calls = _trie(paths)
    batch = pack([(trie, calls)])
    ids, parent, end, pos = (
        t.tolist() for t in (batch.input_ids, batch.parent, batch.end, batch.position_ids)
    )
    assert batch.num_tokens == trie.num_tokens  # every stored token once
    for (path, completion), call in zip(paths, calls, strict=True):
        index = batch.completion_index[call.key].tolist()
        # walking parents back from the last completion token spells the call's path
        walk, t = [], index[-1]
        while t >= 0:
            walk.append(t)
            t = parent[t]
        walk.reverse()
        assert [ids[i] for i in walk] == path and walk[-completion:] == index
        assert [pos[i] for i in walk] == list(range(len(path)))
    for t in range(len(ids)):
        assert parent[t] < t <= end[t]
        if parent[t] >= 0:
            assert end[t] <= end[parent[t]]  # a subtree lies inside its parent's


@pytest.mark.parametrize("seed", range(10))
def test_split_by_budget_keeps_whole_calls_and_repeats_ancestors(seed: int):
    rng = random.Random(seed)
    trie, calls = _trie(_agent_shaped(rng, rollouts=4))
    budget = rng.randint(30, 80)
    batches = split_by_budget(trie, calls, budget)
    assert sorted(c.key for b in batches for c in b) == [c.key for c in calls]
    for b in batches:
        assert pack([(trie, b)]).num_tokens <= budget or len(b) == 1
    stats = packing_stats(trie, calls, batches)
    assert stats.per_path <= stats.per_call and trie.num_tokens <= stats.packed
    one = packing_stats(trie, calls, [calls])
    assert one.packed == trie.num_tokens and one.per_path <= one.per_call


def test_split_keeps_rollouts_whole_and_cuts_between_them():
    """8 rollouts of 3 turns below a 40-token prompt, a budget for the prompt and 3 rollouts: the
    cut falls between rollouts, so only the prompt is repeated (never part of a rollout)."""
    rng = random.Random(0)
    prompt = [rng.randrange(VOCAB) for _ in range(40)]
    paths, rollout_of = [], []
    for r in range(8):
        context = list(prompt)
        for _ in range(3):
            completion = [rng.randrange(VOCAB) for _ in range(6)]
            paths.append((context + completion, 6))
            rollout_of.append(r)
            context = context + completion + [rng.randrange(VOCAB) for _ in range(4)]
    trie, calls = _trie(paths)
    rollout_tokens = (trie.num_tokens - 40) // 8  # 26 each: 3 x 6 sampled + 2 x 4 tool tokens
    batches = split_by_budget(trie, calls, 40 + 3 * rollout_tokens + 10)  # room for part of a 4th
    assert [len(b) for b in batches] == [9, 9, 6]
    for batch in batches:
        assert len({rollout_of[c.key] for c in batch}) * 3 == len(batch)  # whole rollouts only
    assert packing_stats(trie, calls, batches).packed == trie.num_tokens + 2 * 40


# -- the core invariant ---------------------------------------------------------------------------


def _rms_norm_in_own_dtype(norm):
    """transformers' RMSNorm computes in float32 whatever the model's dtype. In a float64 model
    that rounds every gradient through it to float32, and a packed batch (which sums a shared
    prefix's gradient over its calls before that rounding) would then differ from separate calls
    by float32 round-off, hiding what this test checks. Same formula, in the model's dtype."""

    def forward(hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return norm.weight * hidden_states * torch.rsqrt(variance + norm.variance_epsilon)

    norm.forward = forward


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).double()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            _rms_norm_in_own_dtype(module)
    return model


def _separate_loss(model, paths, coefficients) -> torch.Tensor:
    """Each call on its own: a causal forward of its prompt + completion."""
    model.set_attn_implementation("sdpa")
    device = next(model.parameters()).device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for (path, completion), coefficient in zip(paths, coefficients, strict=True):
        ids = torch.tensor(path, device=device)[None]
        logits = model(input_ids=ids).logits[0, :-1]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
        loss = loss + coefficient * logp[-completion:].sum()
    return loss


def _packed_loss(model, trie, calls, coefficients, attention) -> torch.Tensor:
    """As the learner computes it: the LM head applied at the completion tokens only."""
    batch = pack([(trie, calls)])
    index = [batch.completion_index[call.key] for call in calls]
    logp = packed_token_logprobs(model, batch, attention=attention, at=torch.cat(index)).split(
        [i.numel() for i in index]
    )
    return sum(c * call_logp.sum() for call_logp, c in zip(logp, coefficients, strict=True))


def _assert_relative(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= tol * scale, ((a - b).abs().max().item(), scale)


def _assert_packed_matches_separate(seed: int, attention: str, device: str) -> None:
    """Loss and every parameter gradient of the packed trie equal those of the calls run apart."""
    rng = random.Random(seed)
    paths = _agent_shaped(rng, rollouts=3)
    trie, calls = _trie(paths)
    coefficients = [rng.uniform(-1, 1) for _ in calls]
    model = _model().to(device)

    model.zero_grad()
    separate = _separate_loss(model, paths, coefficients)
    separate.backward()
    separate_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    packed = _packed_loss(model, trie, calls, coefficients, attention)
    packed.backward()
    _assert_relative(packed.detach(), separate.detach())
    for name, parameter in model.named_parameters():
        _assert_relative(parameter.grad, separate_grads[name])


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 queries, so that BLOCKS spans these ~70-token tries with many blocks and
    its key selection decides what each block sees."""
    monkeypatch.setattr(tree_attention, "BLOCK_SIZE", 8)


@pytest.mark.parametrize("attention", [SDPA, BLOCKS, VARLEN])
@pytest.mark.parametrize("seed", range(4))
def test_packed_loss_and_gradients_equal_separate_calls(seed: int, attention: str, small_blocks):
    _assert_packed_matches_separate(seed, attention, "cpu")


def test_scoring_some_tokens_equals_scoring_all_then_picking(small_blocks):
    """``at`` skips the LM head elsewhere and changes nothing where it scores: the same logprobs,
    and the same gradients for a loss on them, as scoring every token and indexing."""
    rng = random.Random(11)
    trie, calls = _trie(_agent_shaped(rng, rollouts=3))
    batch = pack([(trie, calls)])
    at = torch.cat([batch.completion_index[call.key] for call in calls])
    assert 0 < at.numel() < batch.num_tokens
    weights = torch.rand(at.numel(), dtype=torch.float64)
    model = _model()
    results = []
    for scored in ("all", "at"):
        model.zero_grad()
        if scored == "all":
            logp = packed_token_logprobs(model, batch, attention=BLOCKS)[at]
        else:
            logp = packed_token_logprobs(model, batch, attention=BLOCKS, at=at)
        (weights * logp).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logp_all, grads_all), (logp_at, grads_at) = results
    _assert_relative(logp_at, logp_all, tol=1e-12)
    for name, grad in grads_at.items():
        _assert_relative(grad, grads_all[name])


def test_flex_attention_gives_the_same_loss_on_cpu():
    """PyTorch has no FlexAttention backward on the CPU: here the forward (logp_old passes)."""
    rng = random.Random(7)
    paths = _agent_shaped(rng, rollouts=3)
    trie, calls = _trie(paths)
    coefficients = [1.0] * len(calls)
    model = _model()
    with torch.no_grad():
        separate = _separate_loss(model, paths, coefficients)
        packed = _packed_loss(model, trie, calls, coefficients, FLEX)
    _assert_relative(packed, separate)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", [SDPA, BLOCKS, FLEX, VARLEN])
def test_packed_gradients_equal_separate_calls_on_cuda(attention: str, small_blocks):
    _assert_packed_matches_separate(3, attention, "cuda")
