"""The optimiser every backend builds over its (local or sharded) parameters: AdamW, then a
learning-rate schedule of linear warm-up and constant or cosine decay.

One definition, so a step means the same on every backend; ``LambdaLR`` multiplies the base rate
by :func:`lr_factor` at the schedule's step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch

from arborl.learner.settings import LearnerSettings


def lr_factor(step: int, *, warmup_steps: int, schedule: str, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up, then constant or a cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(parameters: Iterable[torch.nn.Parameter], settings: LearnerSettings
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    # A partial, not a closure over the settings: LambdaLR saves a callable object's __dict__ in
    # its state, and a resumed run must take its schedule from its configuration, not the checkpoint.
    factor = partial(lr_factor, warmup_steps=settings.warmup_steps, schedule=settings.schedule,
                     total_steps=settings.total_steps, min_lr_ratio=settings.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class OptimizerSteps:
    """The update calls of a backend that owns ``self.optimizer`` and ``self.scheduler`` (from
    :func:`build_optimizer`): what the fsdp and megatron backends share."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        """One optimizer step and one step of the learning-rate schedule."""
        self.optimizer.step()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_base_lr(self, lr: float) -> None:
        set_base_lr(self.optimizer, self.scheduler, lr)


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Replace the schedule's base rate, keeping its position (an operator's ``lr=`` override)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * fn(scheduler.last_epoch)
