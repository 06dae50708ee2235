"""The ``megatron`` backend: megatron-core's GPTModel, tensor-parallel, data-parallel over the rest.

    world = tensor_parallel x data_parallel ranks (megatron's parallel_state; TP ranks adjacent)
    TP group: one copy of the model split across its ranks (column/row-parallel layers,
              vocab-parallel embedding); its ranks run the same micro-batches in lockstep
    DP group: copies of the model; the step's micro-batches are spread over them

Each rank holds its TP shard of every weight (``megatron_weights``) and runs the packed forward of
``megatron_model`` (tree core attention, RoPE by depth). The pieces the seam needs, and why:

- ``dp_rank`` / ``dp_size`` are megatron's data-parallel ones: TP peers are one "rank" for
  ``train_step`` (same micro-batches, same replicated logprobs and losses);
- ``all_reduce_sum`` sums over the DP group only (TP peers hold the same counts: summing over
  the world would count each TP-times);
- gradients are summed over the DP group after the backwards (a sum, as ``base`` says), so
  ``idle_pass`` has nothing to join: the forwards' and backwards' collectives stay inside a TP
  group, whose ranks always have the same micro-batches;
- the gradient norm sums each TP shard's squares over the TP group and counts the replicated
  parameters (norms; their gradients are the same on every TP rank) once;
- the optimiser is the shared AdamW over this rank's shards: elementwise, so it is AdamW on the
  whole model. (Megatron's distributed optimizer wraps a megatron DDP model with CUDA grad
  buffers; it has no CPU path and is not wired here.)

Checkpoints: the Hugging Face folder (rank 0 gathers its TP group's shards and writes
safetensors, what engines and a resume load), plus each rank's optimiser shard:

    step-000012/  config.json, model.safetensors, tokenizer files   (rank 0)
                  megatron_state/rank-000.pt ...  optimiser shard, schedule, step, version, RNG,
                                                  the TP and DP sizes (a resume must match them)

Pipeline parallelism (pp > 1) is refused: it needs the loss computed inside megatron's pipeline
schedule, which this backend does not build.
"""

from __future__ import annotations

import json
import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from arborl.kernels.tree_attention import BLOCKS, SDPA, VARLEN
from arborl.learner.packing import PackedBatch
from arborl.learner.settings import LearnerSettings

from .base import BackendRefused
from .megatron_model import build_gpt_model, packed_logprobs_and_entropy
from .megatron_weights import hf_tensor_reader, is_replicated, to_hf, to_megatron
from .optimizer import OptimizerSteps, build_optimizer

STATE = "megatron_state"


def _load_hf_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _join_model_parallel(tensor_parallel: int, timeout_s: float) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
            raise RuntimeError("megatron's parallel state is initialised with another tensor-parallel size")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             distributed_timeout_minutes=max(1, round(timeout_s / 60)))


class MegatronBackend(OptimizerSteps):
    name = "megatron"
    # FlexAttention under megatron's layers is not exercised here: refused, not assumed.
    attentions = frozenset({BLOCKS, SDPA, VARLEN})

    def __init__(self, model: Any, hf_config: Any, settings: LearnerSettings, *, source: Path):
        from megatron.core import parallel_state

        self.model, self.hf_config, self.source = model, hf_config, source
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.optimizer, self.scheduler = build_optimizer(model.parameters(), settings)

    @classmethod
    def open(cls, folder: Path, settings: LearnerSettings, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> MegatronBackend:
        """This rank's shards of the Hugging Face model in ``folder`` (each rank reads only the
        tensors it needs, and slices them)."""
        if not dist.is_initialized():
            raise RuntimeError("the megatron backend runs inside a torch.distributed process group")
        if settings.pipeline_parallel != 1:
            raise BackendRefused("learner.pipeline_parallel > 1 is not built: pipeline stages need the loss "
                                 "inside megatron's pipeline schedule")
        if dist.get_world_size() % settings.tensor_parallel:
            raise BackendRefused(f"learner.tensor_parallel={settings.tensor_parallel} does not divide the "
                                 f"{dist.get_world_size()} ranks")
        hf_config = _load_hf_config(folder)
        _join_model_parallel(settings.tensor_parallel, settings.collective_timeout_s)
        from megatron.core import parallel_state

        device = torch.device(device)
        model = build_gpt_model(hf_config, tensor_parallel=settings.tensor_parallel, dtype=dtype, device=device)
        local = to_megatron(hf_config, hf_tensor_reader(folder), parallel_state.get_tensor_model_parallel_rank(),
                            settings.tensor_parallel)
        expected = {name for name in model.state_dict() if not name.endswith("._extra_state")}
        if expected != set(local):
            raise RuntimeError(f"megatron mapping mismatch: missing {sorted(expected - set(local))[:4]}, "
                               f"unexpected {sorted(set(local) - expected)[:4]}")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(local[name])
        return cls(model, hf_config, settings, source=folder)

    # -- scoring -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def score(self, batch: PackedBatch, *, attention: str, at: torch.Tensor | None = None,
              grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad):
            return packed_logprobs_and_entropy(self.model, batch, attention=attention, at=at, tp_group=self.tp_group,
                                               vocab_size=self.hf_config.vocab_size)

    def forward_is_deterministic(self) -> bool:
        return True  # no dropout (a model that asks for it is refused: megatron_model.refuse_unsupported), no MoE

    def attention(self, name: str) -> AbstractContextManager[None]:
        return nullcontext()  # nothing to switch: the attention travels with each batch's mask

    def idle_pass(self, *, grad: bool) -> None:
        pass  # nothing to join: see the module docstring

    # -- meeting the other ranks -------------------------------------------------------------

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.detach().clone()
        if self.dp_size > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.dp_group)
        return summed

    def barrier(self) -> None:
        dist.barrier()

    # -- the update --------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _sum_gradients_over_data_parallel(self) -> None:
        if self.dp_size == 1:
            return
        for parameter in self.model.parameters():  # same order on every rank
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM, group=self.dp_group)

    def clip_grad_norm(self, max_norm: float) -> float:
        self._sum_gradients_over_data_parallel()
        sharded = torch.zeros((), dtype=torch.float64, device=next(self.model.parameters()).device)
        replicated = torch.zeros_like(sharded)
        with_grad = [(name, p) for name, p in self.model.named_parameters() if p.grad is not None]
        for name, parameter in with_grad:
            square = parameter.grad.detach().double().pow(2).sum()
            if is_replicated(name):
                replicated += square
            else:
                sharded += square
        if self.tp_size > 1:
            dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=self.tp_group)
        norm = (sharded + replicated).sqrt()
        torch.nn.utils.clip_grads_with_norm_([p for _, p in with_grad], max_norm, norm)
        return float(norm)

    # -- checkpoints -------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective over the TP group of DP rank 0: the Hugging Face weights on global rank 0
        (a tied model's ``lm_head.weight`` is its ``embed_tokens`` tensor, as in its state_dict)."""
        if self.dp_rank != 0:  # the other data-parallel copies hold the same weights
            return {}
        local = {name: p.detach().cpu() for name, p in self.model.named_parameters()}
        shards: list[Any] = [local]
        if self.tp_size > 1:
            shards = [None] * self.tp_size
            dist.gather_object(local, shards if self.tp_rank == 0 else None, group=self.tp_group, group_dst=0)
        if self.rank != 0:  # DP rank 0's TP rank 0 is global rank 0 (TP ranks are adjacent)
            return {}
        weights = to_hf(self.hf_config, shards)
        if self.hf_config.tie_word_embeddings:  # as a tied model's state_dict() names it
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        return weights

    def save(self, folder: Path, *, step: int, version: int) -> None:
        full = self.full_state_dict()
        if self.rank == 0:
            self._write_hf_folder(folder, full)
        rank_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "step": step, "version": version, "rng": torch.get_rng_state(),
                      "tensor_parallel": self.tp_size, "data_parallel": self.dp_size}
        (folder / STATE).mkdir(exist_ok=True)
        torch.save(rank_state, folder / STATE / f"rank-{self.rank:03d}.pt")
        dist.barrier()  # every rank's part is written

    def _write_hf_folder(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        """config.json (and generation_config.json) as the source had them, the weights as
        safetensors (sharded past 5 GB, with an index): a folder transformers and engines load."""
        from huggingface_hub import save_torch_state_dict

        self.hf_config.save_pretrained(folder)
        if (self.source / "generation_config.json").is_file():
            shutil.copy2(self.source / "generation_config.json", folder / "generation_config.json")
        if self.hf_config.tie_word_embeddings:  # one tensor under one name in the file, as save_pretrained writes it
            weights = {name: tensor for name, tensor in weights.items() if name != "lm_head.weight"}
        save_torch_state_dict(weights, folder, metadata={"format": "pt"})

    def load_training_state(self, folder: Path) -> dict[str, Any]:
        path = folder / STATE / f"rank-{self.rank:03d}.pt"
        if not (folder / STATE).is_dir():
            raise BackendRefused(f"{folder} was not written by the megatron backend (no {STATE}/): resume it "
                                 "with the backend that wrote it")
        written = sorted(p.name for p in (folder / STATE).glob("rank-*.pt"))
        if not path.is_file() or len(written) != dist.get_world_size():
            raise BackendRefused(f"{folder} was written by {len(written)} megatron ranks; resume it with as many "
                                 f"(this run has {dist.get_world_size()})")
        state = torch.load(path, map_location="cpu", weights_only=False)
        layout = {"tensor_parallel": self.tp_size, "data_parallel": self.dp_size}
        if {key: state[key] for key in layout} != layout:
            raise BackendRefused(f"{folder} was written with {json.dumps({k: state[k] for k in layout})}; "
                                 f"this run has {json.dumps(layout)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return {"step": state["step"], "version": state["version"]}

    def close(self) -> None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
