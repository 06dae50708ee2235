"""The learner's settings (the CLI's configuration builds these; every field is a config key).

No torch here: the gateway's configuration includes this section, and a gateway forwarding to an
upstream runs without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LearnerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a mistyped key is an error, not a default

    # The training backend (learner.backends): torch, one process; fsdp, torch FSDP2 over nproc
    # data-parallel ranks; megatron, megatron-core with nproc = tensor_parallel x data-parallel
    # ranks (gloo on the CPU, NCCL on GPUs, one GPU per rank).
    backend: Literal["torch", "fsdp", "megatron"] = "torch"
    nproc: int = 1
    tensor_parallel: int = 1  # megatron only: ranks that split each weight (divides nproc)
    pipeline_parallel: int = 1  # megatron only; > 1 is refused (not built)
    collective_timeout_s: float = 1800.0  # how long a rank waits for the others in one collective

    # The optimiser: AdamW with gradient clipping, linear warm-up, then constant or cosine decay.
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = 1000  # the cosine's length
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    # What a step trains on.
    groups_per_step: int = 1
    max_staleness: int = 4  # groups whose oldest token is older than this many versions are dropped
    # The loss and its options (learner.train_step.StepConfig).
    loss: Literal["turn_gspo", "sequence_gspo", "token_ppo"] = "turn_gspo"
    ratio_mode: Literal["mean", "product"] = "mean"
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    use_std: bool = True
    icepop: bool = True
    mcla_passes: int = 1
    difficulty_lambda: float = 0.0
    entropy_mu: float = 0.0
    token_budget: int = 8192
    # kernels.tree_attention: arborl_tree_blocks | arborl_tree_sdpa | arborl_tree_flex | arborl_tree_varlen
    attention: str = "arborl_tree_blocks"
    kl_coef: float = 0.0  # > 0 loads a frozen copy of the starting weights as the reference policy
    opd_lambda: float = 1.0
    teachers: dict[str, str] = Field(default_factory=dict)  # task domain -> teacher model (same tokenizer)
    # Production sessions with feedback (POST /v1/feedback): error-masked SFT on accepted ones, or
    # policy gradient against a running baseline of feedback rewards; "off": never trained on.
    feedback: Literal["off", "sft", "pg"] = "sft"
    feedback_baseline: float = 0.5  # the pg baseline before any feedback
    feedback_baseline_decay: float = 0.9  # baseline <- decay * baseline + (1 - decay) * reward
    # Checkpoints and running.
    keep_checkpoints: int = 3  # the newest N committed checkpoints are kept (weights + optimizer state)
    poll_interval_s: float = 1.0  # how often to look for complete groups when there are none
    seed: int = 0

    def step_config(self):
        from .train_step import StepConfig  # torch: only when training (the upstream gateway runs without it)

        return StepConfig(
            token_budget=self.token_budget, loss=self.loss, mcla_passes=self.mcla_passes, eps_low=self.eps_low,
            eps_high=self.eps_high, ratio_mode=self.ratio_mode, use_std=self.use_std, icepop=self.icepop,
            difficulty_lambda=self.difficulty_lambda, entropy_mu=self.entropy_mu, opd_lambda=self.opd_lambda,
            kl_coef=self.kl_coef, max_grad_norm=self.max_grad_norm, attention=self.attention,
        )
