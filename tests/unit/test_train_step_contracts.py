"""The training step's contracts besides learning (that is tests/unit/test_train_step.py):

- a call whose completion has no context (an empty prompt) is refused, never trained into NaN;
- a step whose loss or gradient norm is not finite changes nothing: no optimizer step, so the
  weights, the optimizer state and the schedule stay as they were, and its metrics say so;
- every pass of a step leaves each model it ran (policy, teacher, reference) on the attention
  implementation it found, so a plain forward works after a step;
- ``clip_frac`` means the same whatever the layout and the token budget.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from arborl.learner import train_step as step_module
from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.logp_old import estimate_logp_old
from arborl.learner.packing import CallSpan, pack
from arborl.learner.train_step import RolloutSample, StepConfig, plan_micro_batches, train_step
from arborl.rollout.trie import Trie
from learner_fixtures import one_torch_thread  # noqa: F401 - the fixture, used below

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 61


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).double().train()


@torch.no_grad()
def _recorded_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """What a serving engine with these weights records for ``completion`` after ``prompt``."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _group(model, rng: random.Random, *, rollouts: int = 3, turns: int = 3, domain: str = "") -> list[RolloutSample]:
    """G agent-shaped rollouts sharing a prompt and one trie: turns, tool output between them."""
    trie = Trie()
    prompt = [rng.randrange(VOCAB) for _ in range(16)]
    samples = []
    for r in range(rollouts):
        context, calls, recorded = list(prompt), [], {}
        for turn in range(turns):
            completion = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 6))]
            call = CallSpan((r, turn), trie.insert(context + completion).leaf, len(completion))
            calls.append(call)
            recorded[call.key] = _recorded_logprobs(model, context, completion)
            context += completion + [rng.randrange(VOCAB) for _ in range(3)]
        samples.append(RolloutSample(trie, calls, float(r), group=0, logp_rollout=recorded, domain=domain))
    return samples


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


# -- calls without a prompt -------------------------------------------------------------------------


def test_a_call_without_a_prompt_is_refused():
    """Its first completion token sits at a trie root: no context, so no logprob and no entropy.
    Trained, that NaN (through entropy-aware rescaling) reached every parameter."""
    model = _model()
    samples = _group(model, random.Random(0))
    empty = Trie()
    call = CallSpan("no-prompt", empty.insert([5, 6, 7]).leaf, 3)
    samples.append(RolloutSample(empty, [call], 1.0, group=0))
    before = _weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="prompt"):
        train_step(TorchBackend(model, optimizer), samples, StepConfig(entropy_mu=0.1))
    _assert_unchanged(model, before)
    for layout in ("tree", "per_rollout", "per_call"):
        with pytest.raises(ValueError, match="prompt"):
            plan_micro_batches(samples, 1 << 20, layout)


# -- non-finite steps -------------------------------------------------------------------------------


def _skipped_step_leaves_everything(model, samples, config: StepConfig) -> dict[str, float]:
    before = _weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = train_step(TorchBackend(model, optimizer, scheduler), samples, config)
    assert metrics["skipped"] == 1.0
    _assert_unchanged(model, before)
    assert optimizer.state == {} and scheduler.last_epoch == 0  # neither took a step
    assert all(p.grad is None for p in model.parameters())  # no non-finite gradient left behind
    return metrics


def test_a_non_finite_loss_skips_the_optimizer_step():
    model = _model()
    samples = _group(model, random.Random(1))
    samples[0].reward = float("nan")  # e.g. a verifier that wrote NaN: every advantage of the group is NaN
    metrics = _skipped_step_leaves_everything(model, samples, StepConfig(entropy_mu=0.1))
    assert math.isnan(metrics["loss"])


def test_a_non_finite_gradient_norm_skips_the_optimizer_step():
    model = _model()
    samples = _group(model, random.Random(2))
    hook = model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    try:
        metrics = _skipped_step_leaves_everything(model, samples, StepConfig())
    finally:
        hook.remove()
    assert math.isfinite(metrics["loss"]) and not math.isfinite(metrics["grad_norm"])


def test_a_finite_step_is_taken_and_says_so():
    model = _model()
    samples = _group(model, random.Random(3))
    before = _weights(model)
    metrics = train_step(TorchBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-2)), samples, StepConfig())
    assert metrics["skipped"] == 0.0
    assert any(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())


# -- attention implementations ----------------------------------------------------------------------


def _plain_forward(model) -> None:
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # raised KeyError: 'tree' on a tree attention


def test_every_pass_leaves_each_model_on_the_attention_it_found():
    model, teacher, reference = _model(0), _model(1).eval(), _model(2).eval()
    teacher.set_attn_implementation("eager")  # whatever a model was on, it is on after the step
    found = {"policy": "sdpa", "teacher": "eager", "reference": "sdpa"}
    models = {"policy": model, "teacher": teacher, "reference": reference}
    samples = _group(model, random.Random(4), domain="math")
    # the old pass (MCLA, K = 2), the teacher's and the reference's passes, then the train pass
    train_step(TorchBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-3)), samples,
               StepConfig(mcla_passes=2, kl_coef=0.1), teachers={"math": TorchBackend(teacher)},
               reference=TorchBackend(reference))
    for name, each in models.items():
        assert each.config._attn_implementation == found[name], name
        _plain_forward(each)
    # and the learner's old-pass estimate on its own
    trie = samples[0].trie
    estimate_logp_old(TorchBackend(model), pack([(trie, [c for s in samples for c in s.calls])]), passes=2)
    assert model.config._attn_implementation == "sdpa"
    _plain_forward(model)


def test_a_failing_pass_also_restores_the_attention(monkeypatch):
    model = _model()
    samples = _group(model, random.Random(5))

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(step_module, "icepop_weights", fail)  # fails after the packed forward ran
    with pytest.raises(RuntimeError, match="out of memory"):
        train_step(TorchBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-3)), samples, StepConfig())
    assert model.config._attn_implementation == "sdpa"
    _plain_forward(model)


# -- clip_frac --------------------------------------------------------------------------------------


def _shifted_old_pass(monkeypatch, scale: float) -> None:
    """logp_old = the model's own logprob + a fixed offset per (token id, depth): the same offset
    for a token whatever micro-batch it lands in, so the ratios (and which clip) do not depend on
    the layout, and some turns clip while others do not."""
    real = step_module.logp_old_and_entropy

    def shifted(policy, batch, *, at, **kwargs):
        logp, entropy = real(policy, batch, at=at, **kwargs)
        ids, depth = batch.input_ids[at].double(), batch.position_ids[at].double()
        return logp + scale * torch.sin(1.7 * ids + 0.3 * depth).to(logp), entropy

    monkeypatch.setattr(step_module, "logp_old_and_entropy", shifted)


LAYOUTS = [("tree", 1 << 20), ("tree", 60), ("tree", 30), ("per_rollout", 1 << 20), ("per_rollout", 40),
           ("per_call", 1 << 20)]


@pytest.mark.parametrize(("loss", "scale"), [("turn_gspo", 2e-3), ("token_ppo", 0.4)])
def test_clip_frac_is_the_same_under_every_layout_and_budget(monkeypatch, loss: str, scale: float):
    """Turn-level GSPO: the fraction of the step's turns (with a token IcePop kept) whose clip
    binds; token-level PPO: the same over tokens. Some turns here are wholly zeroed by IcePop (their
    recorded logprobs are far off), so a micro-batch's share of turns is not its share of calls.
    The mismatch figures are token means over the step, whatever the layout, too."""
    _shifted_old_pass(monkeypatch, scale)
    start = _model()
    samples = _group(start, random.Random(6), rollouts=4)
    for sample in samples[::2]:  # the first turn of every other rollout: k = e^-3 < alpha, all zeroed
        key = sample.calls[0].key
        sample.logp_rollout[key] = sample.logp_rollout[key] + 3.0
    results, micro_batches = {}, set()
    for layout, budget in LAYOUTS:
        model = copy.deepcopy(start)
        config = StepConfig(loss=loss, layout=layout, token_budget=budget, mcla_passes=2)
        backend = TorchBackend(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        results[(layout, budget)] = train_step(backend, samples, config)
        micro_batches.add(results[(layout, budget)]["micro_batches"])
    print(loss, {key: metrics["clip_frac"] for key, metrics in results.items()})
    assert len(micro_batches) >= 4  # the layouts really cut the step differently
    reference = results[("per_call", 1 << 20)]
    assert 0.0 < reference["clip_frac"] < 1.0 and 0.0 < reference["icepop_zeroed_frac"] < 1.0
    for key, metrics in results.items():
        for name in ("clip_frac", "icepop_zeroed_frac"):  # counts over counts: the same to round-off
            assert abs(metrics[name] - reference[name]) <= 1e-12, (key, name, metrics[name], reference[name])
        # logprobs agree across layouts to float32 round-off (RMSNorm computes in float32)
        for name in ("mismatch_abs", "mismatch_kl"):
            assert abs(metrics[name] - reference[name]) <= 1e-6 * reference[name], (key, name)
