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
  pipeline stages, FlexAttention, a model family, RoPE scaling or dropout it does not map) is
  refused at start, with a message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp_cases import CASES as FSDP_CASES
from fsdp_cases import HUGE, Case, assert_matches_torch, run_on_ranks

from arborl.kernels.tree_attention import BLOCKS, FLEX, SDPA, VARLEN
from arborl.learner.backends import BackendSpec
from arborl.learner.backends.base import BackendRefused
from arborl.learner.settings import LearnerSettings
from arborl.learner.train_step import StepConfig
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


def _run_megatron(folder: Path, *, ranks: int, tensor_parallel: int, device: str) -> tuple[dict, dict]:
    """The cases (and their rollouts), and what the megatron ranks made of each."""
    return run_on_ranks(run_cases, CASES, folder, ranks=ranks, device=device, extra=(tensor_parallel,))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def megatron_results(request, tmp_path_factory) -> tuple[dict, dict]:
    ranks, tensor_parallel = LAYOUTS[request.param]
    return _run_megatron(tmp_path_factory.mktemp(f"megatron-{request.param}"), ranks=ranks,
                         tensor_parallel=tensor_parallel, device="cpu")


@pytest.fixture(scope="module")
def megatron_cuda_results(tmp_path_factory) -> tuple[dict, dict]:
    ranks = min(2, torch.cuda.device_count())  # tensor parallel over every GPU used
    return _run_megatron(tmp_path_factory.mktemp("megatron-cuda"), ranks=ranks, tensor_parallel=ranks, device="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_megatron_gives_the_gradients_of_one_torch_process(megatron_results, name: str):
    _assert_matches_torch(megatron_results, name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_megatron_on_cuda_gives_the_gradients_of_one_torch_process(megatron_cuda_results, name: str):
    """NCCL, one rank per GPU (1 or 2, all tensor-parallel), float64, against the torch backend on the CPU."""
    _assert_matches_torch(megatron_cuda_results, name)


def _assert_matches_torch(megatron_results, name: str) -> None:
    with float64_hf_rms_norm():  # the reference side of the one shim (see megatron_cases)
        assert_matches_torch(megatron_results, name)


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
    (_megatron(4, nproc=4), r"does not divide the model's num_key_value_heads \(2\)"),  # before any rank starts
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
        (LlamaConfig(attention_dropout=0.1), 1, "trains without dropout"),
        (LlamaConfig(num_attention_heads=32, num_key_value_heads=8), 3, "does not divide the model's"),
    ]
    for config, ranks, message in cases:
        with pytest.raises(BackendRefused, match=message):
            refuse_unsupported(config, tensor_parallel=ranks)


def test_every_attention_megatron_runs_is_exercised():
    from arborl.learner.backends.megatron_backend import MegatronBackend

    assert {case.config.attention for case in CASES} == MegatronBackend.attentions == {BLOCKS, SDPA, VARLEN}
