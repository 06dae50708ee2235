"""The ``fsdp`` backend: torch FSDP2 (``fully_shard``) over torch.distributed, one rank per process.

    PackedScoring (root FSDP unit: embeddings, final norm, LM head, tied or not)
        model.model.layers[i]  (one FSDP unit per decoder layer: gathered for its forward and
                                backward, resharded after)

Each rank holds 1/world of every parameter, gradient and AdamW moment; a forward all-gathers a
layer's weights, a backward reduce-scatters its gradients. The packed forward is the torch
backend's (``learner.tree_forward``), run inside the root unit's ``forward`` so FSDP's hooks see
every parameter it touches (the head is applied by the fused kernel, not by ``lm_head``'s call).

Gradients are summed over ranks, not averaged (``set_gradient_divide_factor(1)``): each
micro-batch's loss is already its share of the whole step's loss (``learner.train_step``), so
the sum is the single-process gradient, whatever the number of ranks.

Checkpoints (``save``): the whole model gathered to rank 0 and written as a Hugging Face
safetensors folder (what engines load), plus the sharded training state, written by every rank
with torch.distributed.checkpoint:

    step-000012/  config.json, model.safetensors, tokenizer files   (rank 0)
                  fsdp_shards/   model and optimizer shards (DCP: one file per rank + metadata)
                  fsdp_state.pt  schedule, step, version, world size, every rank's RNG

On the CPU the process group is gloo; on GPUs NCCL (with gloo for the CPU-side sums).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from arborl.kernels.tree_attention import BLOCKS, SDPA, VARLEN
from arborl.learner.packing import PackedBatch
from arborl.learner.settings import LearnerSettings
from arborl.learner.tree_forward import packed_logprobs_and_entropy, tree_attention

from .base import BackendRefused
from .hf_model import forward_is_deterministic, load_causal_lm
from .optimizer import OptimizerSteps, build_optimizer

SHARDS = "fsdp_shards"
STATE = "fsdp_state.pt"

# Two tokens, the second read at the first: what a rank with no micro-batch left runs so the
# others' all-gathers and reduce-scatters have it as a partner.
_IDLE = PackedBatch(input_ids=torch.tensor([0, 0]), position_ids=torch.tensor([0, 1]),
                    parent=torch.tensor([-1, 0]), end=torch.tensor([1, 1]))


class PackedScoring(torch.nn.Module):
    """The root FSDP unit: a Hugging Face causal LM's packed forward as one module call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, attention: str, at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_logprobs_and_entropy(self.model, batch, attention=attention, at=at)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (its ``_no_split_modules`` classes: LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise BackendRefused(f"fsdp: cannot find the decoder layers of {type(model).__name__} "
                             "(it names no _no_split_modules)")
    return layers


class FsdpBackend(OptimizerSteps):
    name = "fsdp"
    # FlexAttention's compiled kernels are not exercised under FSDP here: refused, not assumed.
    attentions = frozenset({BLOCKS, SDPA, VARLEN})

    def __init__(self, model: torch.nn.Module, settings: LearnerSettings, *, device: torch.device):
        if not dist.is_initialized():
            raise RuntimeError("the fsdp backend runs inside a torch.distributed process group")
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.rank = self.dp_rank  # every rank is a data-parallel one
        self.device, self.hf = device, model
        for layer in decoder_layers(model):
            fully_shard(layer)
        self.root = PackedScoring(model)
        fully_shard(self.root)
        for module in self.root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # a sum: see the module docstring
                if device.type == "cpu":  # gloo has no pre-multiplied sum (NCCL's PreMulSum), only sums
                    module.set_force_sum_reduction_for_comms(True)
        self.optimizer, self.scheduler = build_optimizer(self.root.parameters(), settings)
        self._attention = SDPA  # the scope's, for idle passes

    @classmethod
    def open(cls, folder: Path, settings: LearnerSettings, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> FsdpBackend:
        """Every rank loads the whole model, then keeps its shard (fine up to a few billion
        parameters on one node; larger models want a meta-device start and a sharded load)."""
        device = torch.device(device)
        return cls(load_causal_lm(folder, dtype=dtype, device=device), settings, device=device)

    # -- scoring -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.root.parameters()).dtype

    def score(self, batch: PackedBatch, *, attention: str, at: torch.Tensor | None = None,
              grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad):
            return self.root(batch, attention, at)

    def forward_is_deterministic(self) -> bool:
        return forward_is_deterministic(self.hf)

    @contextmanager
    def attention(self, name: str) -> Iterator[None]:
        previous, self._attention = self._attention, name  # idle passes run on it too
        try:
            with tree_attention(self.hf, name):
                yield
        finally:
            self._attention = previous

    def idle_pass(self, *, grad: bool) -> None:
        logp, _ = self.score(_IDLE, attention=self._attention, at=torch.tensor([1]), grad=grad)
        if grad:
            self.backward(logp.sum() * 0)

    # -- meeting the other ranks -------------------------------------------------------------

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.detach().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    def barrier(self) -> None:
        dist.barrier()

    # -- the update --------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        parameters = [p for p in self.root.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None],
                                             error_if_nonfinite=False)
        if isinstance(norm, DTensor):  # each rank's shards' partial norm -> the whole gradient's
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return float(norm)

    # -- checkpoints -------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        full = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        prefix = "model."  # PackedScoring's attribute
        # ignore: a full model state dict holds tensors only (its type allows any state value)
        return {name.removeprefix(prefix): tensor for name, tensor in full.items()}  # type: ignore[misc]

    def save(self, folder: Path, *, step: int, version: int) -> None:
        full = self.full_state_dict()
        if self.dp_rank == 0:
            # ignore: transformers' save_pretrained is not on torch.nn.Module
            self.hf.save_pretrained(folder, state_dict=full, safe_serialization=True)  # type: ignore[operator]
        model_state, optimizer_state = get_state_dict(self.root, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / SHARDS)
        rngs: list[Any] = [None] * self.dp_size
        dist.all_gather_object(rngs, torch.get_rng_state())
        if self.dp_rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "step": step, "version": version,
                        "world_size": self.dp_size, "rng": rngs}, folder / STATE)
        dist.barrier()  # every rank's shards are written

    def load_training_state(self, folder: Path) -> dict[str, Any]:
        if not (folder / STATE).is_file():
            raise BackendRefused(f"{folder} was not written by the fsdp backend (no {STATE}): resume it with "
                                 "the backend that wrote it")
        state = torch.load(folder / STATE, map_location="cpu", weights_only=False)
        if state["world_size"] != self.dp_size:
            raise BackendRefused(f"{folder} was written by {state['world_size']} fsdp ranks; resume it with "
                                 f"as many (this run has {self.dp_size})")
        model_state, optimizer_state = get_state_dict(self.root, self.optimizer)
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / SHARDS)  # in place
        set_state_dict(self.root, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][self.dp_rank])
        return {"step": state["step"], "version": state["version"]}

    def close(self) -> None:
        pass
