"""Gradient-equivalence cases for the fsdp backend, run on N gloo ranks (tests/integration/test_fsdp_backend.py);
the megatron suite (``megatron_cases``) runs the same cases and holds its results to the same check.

Each case: a tiny random Llama in float64 (tied embeddings or not), agent-shaped rollouts in
shared tries, a step config (loss, attention, MCLA, rescaling, KL and distillation). Every rank
runs ``train_step`` on the fsdp backend; rank 0 writes the step's metrics and every parameter's
whole gradient (gathered from the shards) for the test to compare with the torch backend's.
The clip bound is huge, so the gradient left after the step is the loss's own.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from arborl.kernels.tree_attention import BLOCKS, SDPA, VARLEN
from arborl.learner.packing import CallSpan
from arborl.learner.settings import LearnerSettings
from arborl.learner.train_step import RolloutSample, StepConfig
from arborl.rollout.trie import Trie

VOCAB = 61


@dataclass
class Case:
    name: str
    tied: bool
    seed: int
    config: StepConfig
    teacher: bool = False  # a distillation teacher for the rollouts' domain
    reference: bool = False  # a reference policy (config.kl_coef > 0)
    family: str = "llama"  # or "qwen2" (biases on q, k and v)


HUGE = 1e9  # the clip bound: the gradient left after the step is the loss's own

CASES = [
    Case("untied-blocks-turn-gspo", tied=False, seed=0,
         config=StepConfig(attention=BLOCKS, token_budget=48, max_grad_norm=HUGE)),
    Case("tied-sdpa-token-ppo-mcla-rescaled", tied=True, seed=1,
         config=StepConfig(attention=SDPA, loss="token_ppo", mcla_passes=2, entropy_mu=0.1, difficulty_lambda=0.5,
                           token_budget=40, max_grad_norm=HUGE)),
    Case("tied-blocks-kl-and-distillation", tied=True, seed=2, teacher=True, reference=True,
         config=StepConfig(attention=BLOCKS, kl_coef=0.1, token_budget=64, max_grad_norm=HUGE)),
    Case("untied-per-call-varlen-sequence", tied=False, seed=3,
         config=StepConfig(attention=VARLEN, layout="per_call", max_grad_norm=HUGE)),
    Case("tied-sequence-gspo", tied=True, seed=4,
         config=StepConfig(attention=SDPA, loss="sequence_gspo", eps_low=0.2, eps_high=0.2, max_grad_norm=HUGE)),
]
METRICS = ("loss", "grad_norm", "clip_frac", "entropy", "tokens", "completion_tokens", "micro_batches",
           "mismatch_abs", "mismatch_kl", "icepop_zeroed_frac", "kl_ref", "lr")


def tiny_model(seed: int, *, tied: bool, family: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    qwen2 = family == "qwen2"
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if qwen2 else (LlamaConfig, LlamaForCausalLM)
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = model_class(config).double().train()
    if family == "qwen2":  # random biases, so a mapping that dropped or misplaced one would show
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("_proj.bias"):
                    parameter.normal_(0, 0.1)
    return model


@torch.no_grad()
def _recorded(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def random_rollouts(model, seed: int, *, groups: int = 2, rollouts: int = 3) -> list[RolloutSample]:
    """Groups of rollouts with random shapes: a shared prompt per group, 1-4 turns, tool output
    between turns, some rollouts branching from another's turn (a retried call)."""
    rng = random.Random(seed)
    samples = []
    for group in range(groups):
        trie = Trie()
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(8, 20))]
        for r in range(rollouts):
            context, calls, recorded = list(prompt), [], {}
            for turn in range(rng.randint(1, 4)):
                completion = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 7))]
                call = CallSpan((group, r, turn), trie.insert(context + completion).leaf, len(completion))
                calls.append(call)
                recorded[call.key] = _recorded(model, context, completion)
                context += completion + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))]
            samples.append(RolloutSample(trie, calls, float(rng.random() < 0.5) + 0.1 * r, group=group,
                                         logp_rollout=recorded, domain="math"))
    return samples


def run_on_ranks(target: Callable[..., None], cases: list[Case], folder: Path, *, ranks: int, device: str,
                 extra: tuple = ()) -> tuple[dict, dict]:
    """Write each case's model and rollouts (and the teacher) into ``folder``, run
    ``target(rank, ranks, address, folder, device, *extra)`` on ``ranks`` spawned processes, and
    return the cases by name with what rank 0 wrote (``folder/results.pt``)."""
    written = []
    for case in cases:
        model = tiny_model(case.seed, tied=case.tied, family=case.family)
        model.save_pretrained(folder / case.name)
        written.append((case, random_rollouts(model, case.seed)))
    tiny_model(99, tied=True).save_pretrained(folder / "teacher")
    torch.save(written, folder / "cases.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    import torch.multiprocessing as mp

    mp.start_processes(target, args=(ranks, address, folder, device, *extra), nprocs=ranks, start_method="spawn")
    results = torch.load(folder / "results.pt", weights_only=False)
    return {case.name: (case, samples) for case, samples in written}, results | {"folder": folder}


def join_group(rank: int, world: int, address: str, device: str) -> torch.device:
    """This rank in the test's process group (gloo on the CPU; NCCL and cuda:rank on GPUs); its device."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    where = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo", init_method=address, rank=rank,
                            world_size=world, timeout=timedelta(minutes=5))
    return where


def run_cases(rank: int, world: int, address: str, folder: Path, device: str = "cpu") -> None:
    """One rank: every case in ``folder/cases.pt``, fsdp ``train_step``; rank 0 writes the results
    (on the CPU: gloo; ``device="cuda"``: NCCL, rank r on cuda:r)."""
    import torch.distributed as dist

    from arborl.learner.backends.fsdp_backend import FsdpBackend
    from arborl.learner.backends.hf_model import load_frozen
    from arborl.learner.backends.torch_backend import TorchBackend
    from arborl.learner.train_step import train_step

    where = join_group(rank, world, address, device)
    cases = torch.load(folder / "cases.pt", weights_only=False)
    results = {}
    for case, samples in cases:
        weights = folder / case.name
        backend = FsdpBackend.open(weights, LearnerSettings(lr=1e-3), dtype=torch.float64, device=where)
        teacher = folder / "teacher"
        teachers = ({"math": TorchBackend(load_frozen(teacher, dtype=torch.float64, device=where))}
                    if case.teacher else {})
        reference = TorchBackend(load_frozen(weights, dtype=torch.float64, device=where)) if case.reference else None
        metrics = train_step(backend, samples, case.config, teachers=teachers, reference=reference)
        grads = {name.removeprefix("model."): p.grad.full_tensor().cpu() for name, p in backend.root.named_parameters()}
        after = backend.full_state_dict()
        if rank == 0:
            results[case.name] = {"metrics": metrics, "grads": grads, "weights": after}
    if rank == 0:
        torch.save(results, folder / "results.pt")
    dist.destroy_process_group()


def _close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= 1e-9 * abs(theirs) + 1e-15


def torch_reference_step(folder: Path, case: Case, samples) -> tuple[dict, torch.nn.Module]:
    """The case's step on the single-process torch backend: its metrics and the model it left."""
    from arborl.learner.backends.hf_model import load_causal_lm, load_frozen
    from arborl.learner.backends.optimizer import build_optimizer
    from arborl.learner.backends.torch_backend import TorchBackend
    from arborl.learner.train_step import train_step

    model = load_causal_lm(folder / case.name, dtype=torch.float64)
    teachers = {"math": TorchBackend(load_frozen(folder / "teacher", dtype=torch.float64))} if case.teacher else {}
    reference = TorchBackend(load_frozen(folder / case.name, dtype=torch.float64)) if case.reference else None
    backend = TorchBackend(model, *build_optimizer(model.parameters(), LearnerSettings(lr=1e-3)))
    return train_step(backend, samples, case.config, teachers=teachers, reference=reference), model


def assert_matches_torch(run: tuple[dict, dict], name: str) -> None:
    """A backend's results for case ``name`` (metrics, every gradient and the weights after the
    step, Hugging Face names) equal the torch backend's to 1e-9 relative."""
    cases, results = run
    case, samples = cases[name]
    ours = results[name]
    theirs, model = torch_reference_step(results["folder"], case, samples)
    assert theirs["skipped"] == 0 and ours["metrics"]["skipped"] == 0
    for key in METRICS:
        if key in theirs:
            assert key in ours["metrics"], key
            assert _close(ours["metrics"][key], theirs[key]), (key, ours["metrics"][key], theirs[key])
    assert theirs["grad_norm"] > 0
    for parameter_name, parameter in model.named_parameters():
        grad, expected = ours["grads"][parameter_name], parameter.grad
        assert expected is not None and expected.norm() > 0, parameter_name
        assert (grad - expected).norm() <= 1e-9 * expected.norm(), (parameter_name, (grad - expected).norm())
    state = model.state_dict()
    assert ours["weights"].keys() >= {n for n, _ in model.named_parameters()}
    for parameter_name, weight in ours["weights"].items():  # after the same AdamW step
        torch.testing.assert_close(weight.cpu(), state[parameter_name], rtol=1e-9, atol=1e-12)
