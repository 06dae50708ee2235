"""The megatron backend gives the torch backend's numbers: megatron-core on gloo ranks, float64.

- the gradient-equivalence suite (the fsdp suite's cases, plus a Qwen2 model with q/k/v biases):
  with tensor parallelism 2 (each weight split over both ranks; the odd vocabulary padded), with
  data parallelism 2 (TP 1), and with both on 4 ranks, the loss, the metrics and every parameter's gradient, mapped
  back to Hugging Face names, equal the single-process torch backend's to 1e-9 relative, and so
  do the weights after the AdamW step (see ``megatron_cases`` for the one test shim: Hugging
  Face's float32 RMSNorm is run in float64 on the reference side);
- a checkpoint is a Hugging Face folder transformers loads with the trained weights, bit for bit,
  and a reopened backend restores step, version and every optimiser moment from it;
- the Hugging Face <-> megatron mapping is exact both ways for any TP size that divides the model;
- a setting megatron cannot run (a TP size that does not divide the ranks or the heads,
  pipeline stages, FlexAttention, a model family or RoPE scaling it does not map) is refused at
  start, with a message.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fsdp_cases import CASES as FSDP_CASES
from fsdp_cases import HUGE, METRICS, Case, random_rollouts, tiny_model

from arborl.kernels.tree_attention import BLOCKS, FLEX, SDPA
from arborl.learner.backends import BackendSpec
from arborl.learner.backends.base import BackendRefused
from arborl.learner.backends.optimizer import build_optimizer
from arborl.learner.backends.torch_backend import TorchBackend
from arborl.learner.settings import LearnerSettings
from arborl.learner.train_step import StepConfig, train_step
from arborl.learner.trainer import check_spec

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'arborl[megatron]')")

from megatron_cases import float64_hf_rms_norm, run_cases  # noqa: E402

from arborl.learner.backends.megatron_model import refuse_unsupported  # noqa: E402
from arborl.learner.backends.megatron_weights import to_hf, to_megatron  # noqa: E402

CASES = [*FSDP_CASES,
         Case("qwen2-tied-blocks-turn-gspo-biases", tied=True, seed=5, family="qwen2",
              config=StepConfig(attention=BLOCKS, token_budget=48, max_grad_norm=HUGE))]
# (ranks, tensor parallel size): the rest of the ranks are data-parallel. With 4 ranks, a sum over
# the wrong group (the world instead of TP or DP) shows; with 2, one of the groups is the world.
LAYOUTS = {"tp2": (2, 2), "dp2": (2, 1), "tp2-dp2": (4, 2)}


def _address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module", params=list(LAYOUTS))
def megatron_results(request, tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp(f"megatron-{request.param}")
    cases = []
    for case in CASES:
        model = tiny_model(case.seed, tied=case.tied, family=case.family)
        model.save_pretrained(folder / case.name)
        cases.append((case, random_rollouts(model, case.seed)))
    tiny_model(99, tied=True).save_pretrained(folder / "teacher")
    torch.save(cases, folder / "cases.pt")
    ranks, tensor_parallel = LAYOUTS[request.param]
    mp.start_processes(run_cases, args=(ranks, tensor_parallel, _address(), folder), nprocs=ranks,
                       start_method="spawn")
    results = torch.load(folder / "results.pt", weights_only=False)
    return {case.name: (case, samples) for case, samples in cases}, results | {"folder": folder}


def _close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= 1e-9 * abs(theirs) + 1e-15


def _torch_step(folder: Path, case: Case, samples) -> tuple[dict, torch.nn.Module]:
    from arborl.learner.backends.hf_model import load_causal_lm, load_frozen

    with float64_hf_rms_norm():
        model = load_causal_lm(folder / case.name, dtype=torch.float64)
        teachers = ({"math": TorchBackend(load_frozen(folder / "teacher", dtype=torch.float64))}
                    if case.teacher else {})
        reference = TorchBackend(load_frozen(folder / case.name, dtype=torch.float64)) if case.reference else None
        backend = TorchBackend(model, *build_optimizer(model.parameters(), LearnerSettings(lr=1e-3)))
        return train_step(backend, samples, case.config, teachers=teachers, reference=reference), model


@pytest.mark.slow
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_megatron_gives_the_gradients_of_one_torch_process(megatron_results, name: str):
    cases, results = megatron_results
    case, samples = cases[name]
    ours = results[name]
    theirs, model = _torch_step(results["folder"], case, samples)
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
        torch.testing.assert_close(weight, state[parameter_name], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_a_megatron_checkpoint_is_a_hugging_face_folder_and_resumes(megatron_results):
    from transformers import AutoModelForCausalLM

    _, results = megatron_results
    resume = results["resume"]
    trained = results[resume["last_case"]]["weights"]
    loaded = AutoModelForCausalLM.from_pretrained(results["folder"] / "checkpoint", dtype=torch.float64).state_dict()
    assert trained.keys() <= loaded.keys()
    for name, weight in trained.items():
        assert torch.equal(loaded[name], weight), name
    assert resume["state"] == {"step": 7, "version": 3}
    assert resume["same_optimizer"]
    for name, weight in resume["weights"].items():  # the reopened backend holds what was written
        assert torch.equal(weight, trained[name]), name


@pytest.mark.parametrize(("family", "tied", "ranks", "heads", "kv_heads"), [
    ("llama", True, 1, 6, 3), ("llama", False, 2, 4, 2), ("llama", True, 3, 6, 3), ("qwen2", False, 3, 6, 3),
    ("qwen2", True, 2, 8, 2)])
def test_the_weight_mapping_is_exact_both_ways(family: str, tied: bool, ranks: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    qwen2 = family == "qwen2"
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if qwen2 else (LlamaConfig, LlamaForCausalLM)
    # 61 tokens: the vocabulary is padded for 2 and 3 ranks
    config = config_class(vocab_size=61, hidden_size=heads * 4, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = model_class(config).state_dict()
    if tied:
        hf.pop("lm_head.weight")
    shards = [to_megatron(config, hf, rank, ranks) for rank in range(ranks)]
    assert len({shard["embedding.word_embeddings.weight"].shape for shard in shards}) == 1
    back = to_hf(config, shards)
    assert back.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def _megatron(tensor_parallel: int = 1, **settings) -> LearnerSettings:
    return LearnerSettings(backend="megatron", tensor_parallel=tensor_parallel, **settings)


@pytest.mark.parametrize(("settings", "message"), [
    (_megatron(2, nproc=3), "must divide learner.nproc=3"),
    (_megatron(1, nproc=2, pipeline_parallel=2), "pipeline_parallel > 1 is not built"),
    (_megatron(1, nproc=2, attention=FLEX), "does not run attention"),
    (LearnerSettings(backend="fsdp", nproc=2, tensor_parallel=2), "are megatron settings"),
    (LearnerSettings(backend="torch", pipeline_parallel=2), "are megatron settings"),
])
def test_a_setting_megatron_does_not_run_is_refused_at_start(settings, message, tiny_model_dir):
    with pytest.raises(BackendRefused, match=message):
        check_spec(BackendSpec(weights=tiny_model_dir, settings=settings))


def test_a_model_the_mapping_does_not_cover_is_refused():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cases = [
        (Qwen3Config(), 1, "maps llama, qwen2 models; this one is 'qwen3'"),
        (LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}), 1, "rope scaling"),
        (Qwen2Config(use_sliding_window=True, max_window_layers=0), 1, "no sliding window"),
        (LlamaConfig(mlp_bias=True), 1, "without attention or MLP biases"),
        (LlamaConfig(num_attention_heads=32, num_key_value_heads=8), 3, "does not divide the model's"),
    ]
    for config, ranks, message in cases:
        with pytest.raises(BackendRefused, match=message):
            refuse_unsupported(config, tensor_parallel=ranks)


def test_both_attentions_of_the_suite_are_exercised():
    assert {case.config.attention for case in CASES} == {BLOCKS, SDPA}
