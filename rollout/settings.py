"""The rollout orchestrator's settings (the CLI's configuration builds these; every field is a
config key under ``rollout:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .sandboxes.base import SandboxKind
from .sandboxes.k8s_pod import PodOptions


class RolloutSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a mistyped key is an error, not a default

    # Which agent runs each rollout: one scaffold, or a mixture {name: weight} sampled per rollout
    # (names: builtin, oracle, nop, and every agent CLI in scaffold_adapters/registry.py).
    scaffolds: dict[str, float] = Field(default_factory=lambda: {"builtin": 1.0})
    group_size: int = 4  # G: rollouts of one task per group
    concurrency: int = 2  # rollouts running at once
    sandbox: SandboxKind = "local"
    # The docker sandbox's container image (it must hold bash, coreutils and the scaffolds the
    # run uses) and docker network ("host": the agent reaches the gateway as a local one does).
    docker_image: str | None = None
    docker_network: str = "host"
    docker_cli: str = "docker"  # the client that runs them: docker, or podman (the same command lines)
    # The k8s sandbox's pods (image required; namespace, runtime class, cpu, node selector).
    k8s: PodOptions = Field(default_factory=PodOptions)
    # Limits per rollout. The task's own agent timeout applies unless this is lower.
    agent_timeout_s: float | None = None
    max_turns: int = 30  # model calls per rollout; the builtin agent stops itself, a CLI is stopped
    command_timeout_s: float = 60.0  # one command of the builtin agent
    memory_mb: int = 4096  # RLIMIT_DATA per process in the sandbox (raised to a CLI's floor: OpenClaw 8192)
    processes: int = 512  # processes and threads of the whole sandbox
    infra_retries: int = 2  # new attempts after an infrastructure failure
    # The builtin agent's sampling.
    max_tokens: int = 1024
    temperature: float | None = None  # None: the gateway's default (1.0)
    # A folder of programs put first on the sandbox's PATH (and shown read-only under bwrap): a
    # python3 with pytest where the system's has none. Default: the system's (Debian python3-pytest).
    task_path: str | None = None
    # The LLM judge of judge-graded tasks: an OpenAI-compatible base URL (e.g. a gateway with the
    # upstream engine: http://127.0.0.1:8000/v1) and its model. Without it such tasks cannot run.
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key: str | None = None
    keep_workspaces: bool = False  # leave each rollout's sandbox folder for inspection
    seed: int = 0  # the scaffold mixture's draws
    # Synchronous RL (rollout/learner_gate.py): a training group starts only once the learner has
    # trained on the finished ones and the gateway serves the result. Default: asynchronous.
    synchronous: bool = False

    @field_validator("scaffolds")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("at least one scaffold is needed")
        if any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            raise ValueError("scaffold weights must be >= 0 and not all 0")
        return value

    @field_validator("group_size", "concurrency", "max_turns")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @model_validator(mode="after")
    def _containers_need_an_image(self) -> RolloutSettings:
        if self.sandbox == "docker" and not self.docker_image:
            raise ValueError("rollout.sandbox docker needs rollout.docker_image: an image with bash, coreutils "
                             "and the scaffolds the run uses")
        if self.sandbox == "k8s" and not self.k8s.image:
            raise ValueError("rollout.sandbox k8s needs rollout.k8s.image: an image with bash, coreutils and the "
                             "scaffolds the run uses")
        return self
