"""Training backends: what holds the policy's weights and runs its forwards, backwards and steps.

    torch     one process, one device (learner.backends.torch_backend)
    fsdp      torch FSDP2 across data-parallel ranks (learner.backends.fsdp_backend)
    megatron  megatron-core's GPTModel, tensor x data parallel (learner.backends.megatron_backend)

``learner.train_step`` speaks only to the seam (``learner.backends.base``); ``learner.trainer``
opens a backend (and its ranks) from a :class:`BackendSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from arborl.learner.settings import LearnerSettings


@dataclass(frozen=True)
class BackendSpec:
    """Everything a rank needs to open its part of the learner (it is pickled to each rank)."""

    weights: Path  # a Hugging Face folder: the base model, or the checkpoint being resumed
    settings: LearnerSettings  # backend, nproc, attention, the optimiser and its schedule
    device: str = "cpu"  # "cpu" or "cuda" (rank r of a multi-GPU run takes cuda:r)
    dtype: str = "float32"
    teachers: dict[str, Path] = field(default_factory=dict)  # task domain -> teacher folder
    reference: Path | None = None  # the frozen reference policy (KL), if any
    tokenizer_dir: Path | None = None  # copied into each checkpoint
