"""arborl's configuration: typed, loadable from YAML or TOML, overridable by env vars and flags.

Precedence, lowest first: defaults < config file < ``ARBORL_<SECTION>__<FIELD>`` environment
variables (for example ``ARBORL_ENGINE__MODEL=/models/qwen``) < command-line flags.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from arborl.gateway.engines.model_source import DEFAULT_MODEL
from arborl.gateway.settings import GatewaySettings
from arborl.learner.settings import LearnerSettings
from arborl.rollout.settings import RolloutSettings


class EngineConfig(BaseModel):
    kind: Literal["embedded", "upstream"] = "embedded"
    model: str = DEFAULT_MODEL  # the default, "tiny-random-llama", or a Hugging Face model folder
    served_name: str | None = None  # the name clients use; defaults to the model folder's name
    device: str | None = None  # cpu | cuda | cuda:N; default: cuda when available
    max_running: int = 16
    prefill_chunk: int = 512
    cache_memory_gb: float = 2.0
    # kind "upstream": forward to another server instead of running a model.
    upstream_url: str | None = None  # OpenAI: http://host/v1; Anthropic: https://host
    upstream_api: Literal["openai", "anthropic"] = "openai"
    upstream_model: str | None = None  # the model name the upstream knows; default: served_name
    upstream_api_key: str | None = None
    upstream_timeout_s: float = 600.0
    tokenizer: str | None = None  # a model folder (or the default's name) to record upstream calls as ids


class StoreConfig(BaseModel):
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"


class UpSettings(BaseModel):
    """What ``arborl up`` runs besides the gateway."""

    dataset: str = "builtin"  # the rollout workers' tasks (and the held-out evaluation's)
    train_split: str = "train"
    # Only train on tasks of these difficulties (say [easy] for a model too small for the rest:
    # a task no rollout ever solves gives groups of equal rewards, which teach nothing).
    train_difficulty: list[str] | None = None
    heldout_split: str = "heldout"
    heldout_every: int = 10  # a held-out evaluation every N committed steps (and of version 0); 0: never
    heldout_k: int = 1
    heldout_limit: int | None = None  # only the first N held-out tasks
    rollouts: bool = True
    learner: bool = True
    learner_metrics_port: int = 8001
    rollout_metrics_port: int = 8002
    max_restarts: int = 5  # per child; beyond it `arborl up` stops


# What `arborl up` starts from, under any config file, env var or flag: sized so the default
# 135M-parameter model learns on a 2-core CPU within the hour (README, "The learning curve").
# The builtin agent samples at 0.7 (at 1.0 the model rambles and never runs a command) and at
# most 4 turns of 256 tokens; rollouts train on the easy tasks, the only ones it ever solves
# (a group whose rollouts all fail teaches nothing and costs four rollouts). A bigger model wants
# train_difficulty null, more turns and tokens: set them in the config file.
UP_DEFAULTS: dict[str, Any] = {
    "gateway": {"any_model_name": True},  # an agent pointed at the URL alone just works (SERVE_DEFAULTS)
    "rollout": {"temperature": 0.7, "max_tokens": 256, "max_turns": 4, "concurrency": 4},
    "learner": {"lr": 2e-5},
    "up": {"train_difficulty": ["easy"]},
}
# What `arborl serve` starts from: the policy answers any model name an agent asks for.
SERVE_DEFAULTS: dict[str, Any] = {"gateway": {"any_model_name": True}}


class ArborlConfig(BaseModel):
    run_dir: Path = Path("runs/default")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    store: StoreConfig = Field(default_factory=StoreConfig)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    up: UpSettings = Field(default_factory=UpSettings)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith("ARBORL_") or "__" not in name:
            continue
        path = name[len("ARBORL_") :].lower().split("__")
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = yaml.safe_load(value) if value else value
    return out


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
    *, defaults: dict[str, Any] | None = None,
) -> ArborlConfig:
    """``defaults`` (a command's own, like UP_DEFAULTS) < the file < env vars < ``overrides``."""
    data: dict[str, Any] = dict(defaults or {})
    if path is not None:
        path = Path(path)
        text = path.read_text()
        data = _merge(data, tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {})
    data = _merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    data = _merge(data, overrides or {})
    return ArborlConfig.model_validate(data)
