"""The fsdp backend gives the torch backend's numbers: 2 gloo ranks on the CPU, float64.

- the gradient-equivalence suite: for random tries and every kind of step (turn-level GSPO,
  token PPO with MCLA and entropy/difficulty rescaling, KL to a reference and distillation, tied
  and untied embeddings, tree and per-call layouts, blocks and SDPA attention), the loss, the
  metrics and every parameter's gradient on 2 fsdp ranks equal the single-process torch
  backend's to 1e-9 relative, and so do the weights after the AdamW step;
- micro-batches are spread over the ranks (some cases leave one rank idle for a round, so its
  idle passes are exercised);
- a setting a backend does not run (FlexAttention on fsdp, several torch processes) is refused
  when the learner opens, with a message.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fsdp_cases import CASES, assert_matches_torch, random_rollouts, run_cases, run_on_ranks, tiny_model

from arborl.kernels.tree_attention import FLEX
from arborl.learner.backends import BackendSpec
from arborl.learner.backends.base import BackendRefused
from arborl.learner.settings import LearnerSettings
from arborl.learner.train_step import assign_to_ranks, plan_micro_batches
from arborl.learner.trainer import check_spec


def _run_fsdp(folder: Path, *, device: str, ranks: int) -> tuple[dict, dict]:
    """The cases (and their rollouts), and what ``ranks`` fsdp ranks made of each."""
    return run_on_ranks(run_cases, CASES, folder, ranks=ranks, device=device)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> tuple[dict, dict]:
    return _run_fsdp(tmp_path_factory.mktemp("fsdp"), device="cpu", ranks=2)


@pytest.fixture(scope="module")
def fsdp_cuda_results(tmp_path_factory) -> tuple[dict, dict]:
    return _run_fsdp(tmp_path_factory.mktemp("fsdp-cuda"), device="cuda", ranks=min(2, torch.cuda.device_count()))


@pytest.mark.slow
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_two_fsdp_ranks_give_the_gradients_of_one_torch_process(fsdp_results, name: str):
    assert_matches_torch(fsdp_results, name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_fsdp_on_cuda_gives_the_gradients_of_one_torch_process(fsdp_cuda_results, name: str):
    """NCCL, one rank per GPU (1 or 2), float64, against the torch backend on the CPU."""
    assert_matches_torch(fsdp_cuda_results, name)


def test_the_cases_spread_micro_batches_over_both_ranks_and_leave_one_idle_sometimes():
    """What the suite above exercises (checked here, where it is cheap): both ranks train in every
    case, and some case has a round where one rank has no micro-batch (its idle passes)."""
    uneven = False
    for case in CASES:
        model = tiny_model(case.seed, tied=case.tied)
        config = case.config
        if config.loss == "sequence_gspo":
            config = replace(config, layout="per_rollout", token_budget=1 << 62)
        owned = assign_to_ranks(plan_micro_batches(random_rollouts(model, case.seed), config.token_budget,
                                                   config.layout), 2)
        assert all(owned), (case.name, owned)
        uneven |= len(owned[0]) != len(owned[1])
    assert uneven


def test_one_rank_runs_every_micro_batch_in_plan_order():
    model = tiny_model(0, tied=False)
    micro = plan_micro_batches(random_rollouts(model, 0), 48)
    assert assign_to_ranks(micro, 1) == [list(range(len(micro)))]


@pytest.mark.parametrize(("settings", "message"), [
    (LearnerSettings(backend="fsdp", nproc=2, attention=FLEX), "does not run attention"),
    (LearnerSettings(backend="torch", nproc=2), "needs backend fsdp"),
    (LearnerSettings(backend="fsdp", nproc=0), "at least 1"),
])
def test_a_setting_a_backend_does_not_run_is_refused_at_start(settings, message, tiny_model_dir):
    with pytest.raises(BackendRefused, match=message):
        check_spec(BackendSpec(weights=tiny_model_dir, settings=settings))
