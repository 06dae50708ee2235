"""The ``torch`` backend: one process, one device (CPU or one GPU), a Hugging Face model.

This is the learner as it always ran: the packed forward of ``learner.tree_forward``, AdamW with
``learner.backends.optimizer``'s schedule, ``clip_grad_norm_``, and checkpoints that are a
``save_pretrained`` folder plus ``training_state.pt`` (see ``learner.checkpoint``). One rank, so
its collectives are the identity.

A backend without an optimizer is a frozen scorer (a teacher, the reference policy).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from arborl.kernels.tree_attention import BLOCKS, FLEX, SDPA, VARLEN
from arborl.learner.packing import PackedBatch
from arborl.learner.settings import LearnerSettings
from arborl.learner.tree_forward import packed_logprobs_and_entropy, tree_attention

from .hf_model import forward_is_deterministic, load_causal_lm
from .optimizer import build_optimizer, set_base_lr

TRAINING_STATE = "training_state.pt"


class TorchBackend:
    name = "torch"
    rank, dp_rank, dp_size = 0, 0, 1
    attentions = frozenset({BLOCKS, SDPA, FLEX, VARLEN})

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: torch.optim.lr_scheduler.LambdaLR | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    @classmethod
    def open(cls, folder: Path, settings: LearnerSettings, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> TorchBackend:
        """The policy from ``folder`` with a fresh optimizer (``load_training_state`` restores one)."""
        model = load_causal_lm(folder, dtype=dtype, device=device)
        return cls(model, *build_optimizer(model.parameters(), settings))

    # -- scoring -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def score(self, batch: PackedBatch, *, attention: str, at: torch.Tensor | None = None,
              grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad):
            return packed_logprobs_and_entropy(self.model, batch, attention=attention, at=at)

    def forward_is_deterministic(self) -> bool:
        return forward_is_deterministic(self.model)

    def attention(self, name: str) -> AbstractContextManager[None]:
        return tree_attention(self.model, name)

    # -- one rank: nothing to meet -----------------------------------------------------------

    def idle_pass(self, *, grad: bool) -> None:
        raise AssertionError("one rank never waits for another")

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def barrier(self) -> None:
        pass

    # -- the update --------------------------------------------------------------------------

    def _trained(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError("this backend is frozen (no optimizer): it scores, it does not train")
        return self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self._trained().zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def optimizer_step(self) -> None:
        self._trained().step()
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self._trained().param_groups[0]["lr"])

    def set_base_lr(self, lr: float) -> None:
        if self.scheduler is None:
            for group in self._trained().param_groups:
                group["lr"] = lr
        else:
            set_base_lr(self._trained(), self.scheduler, lr)

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, folder: Path, *, step: int, version: int) -> None:
        # ignore: transformers' save_pretrained is not on torch.nn.Module
        self.model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
        if self.optimizer is not None:
            state = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                     "step": step, "version": version, "rng": torch.get_rng_state()}
            torch.save(state, folder / TRAINING_STATE)

    def load_training_state(self, folder: Path) -> dict[str, Any]:
        """The optimizer, schedule and RNG (the weights were loaded from the same folder by ``open``)."""
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
        self._trained().load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return {"step": state["step"], "version": state["version"]}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def close(self) -> None:
        pass
