"""arborl's configuration: typed, loadable from YAML or TOML, overridable by env vars and flags.

Precedence, lowest first: a command's own defaults (``UP_DEFAULTS``, ``SERVE_DEFAULTS``) < the
config file < ``ARBORL_<SECTION>__<FIELD>`` environment variables (for example
``ARBORL_ENGINE__MODEL=/models/qwen``) < command-line flags (``load_config``'s ``overrides``).
A layer replaces single keys of a section, never the whole section.

Invariants:
- Every key is known. Every settings model forbids fields it does not have, so a typo in the file,
  an env var or an override is a ConfigError naming ``section.key`` (and the closest known key, and
  the env var that set it), never a setting silently left at its default.
- Only ``ARBORL_`` names with a double underscore are configuration, and each must name a section:
  ``ARBORL_LERNER__LR`` is refused. The single-underscore ones (``ARBORL_ADMIN_TOKEN``,
  ``ARBORL_SUPERVISOR_PID``, ``ARBORL_CACHE``, ``ARBORL_RUN_DIR``, ...) belong to the CLI and its
  children and are neither read nor refused here; ``run_dir`` is set by the file or ``--run-dir``.
- Env values (pydantic-settings' env source, with YAML for containers): a scalar field takes the
  string as pydantic coerces it (``8`` -> 8, ``false`` -> False, ``1e-5`` -> 1e-05) and ``null`` is
  None; a list, tuple or dict field parses it as YAML, so JSON too (``[easy]``, ``{"builtin": 3}``).
  A key of a dict field may be its own variable: ``ARBORL_GATEWAY__ADMIN_KEYS__ALICE=...``.
- An ``ArborlConfig`` built in code is exactly what it is given: only ``load_config`` reads files
  and the environment.
- Errors name keys, never values: configuration holds secrets (operator, API and upstream keys).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from arborl.gateway.engines.model_source import DEFAULT_MODEL
from arborl.gateway.settings import GatewaySettings
from arborl.learner.settings import LearnerSettings
from arborl.rollout.settings import RolloutSettings

ENV_PREFIX = "ARBORL_"
ENV_DELIMITER = "__"


class ConfigError(ValueError):
    """A configuration that cannot be used, one line per problem (the CLI prints it, no traceback)."""


class EmbeddedEngineConfig(BaseModel):
    """``engine.kind: embedded`` (the default): the model runs in the gateway's own process."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["embedded"] = "embedded"
    model: str = DEFAULT_MODEL  # the default, "tiny-random-llama", or a Hugging Face model folder
    served_name: str | None = None  # the name clients use; defaults to the model folder's name
    device: str | None = None  # cpu | cuda | cuda:N; default: cuda when available
    max_running: int = 16
    prefill_chunk: int = 512
    cache_memory_gb: float = 2.0


class UpstreamEngineConfig(BaseModel):
    """``engine.kind: upstream``: forward to another OpenAI- or Anthropic-compatible server."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # hide: upstream_api_key

    kind: Literal["upstream"] = "upstream"
    served_name: str | None = None  # the name clients use; defaults to upstream_model
    upstream_url: str | None = None  # OpenAI: http://host/v1; Anthropic: https://host
    upstream_api: Literal["openai", "anthropic"] = "openai"
    upstream_model: str | None = None  # the model name the upstream knows; default: served_name
    upstream_api_key: str | None = None
    upstream_timeout_s: float = 600.0
    tokenizer: str | None = None  # a model folder (or the default's name) to record upstream calls as ids


class ServerEngineConfig(BaseModel):
    """What the engines that are inference servers share (``vllm``, ``sglang``): where the
    servers are, how arborl starts them if it does, and how calls and versions are spread over
    them (gateway/engines/replica_router.py)."""

    model_config = ConfigDict(extra="forbid")

    # The servers' roots, comma-separated for several replicas ("http://h1:8100,http://h2:8100").
    # With launch, the first replica listens on url's loopback port and replica i on that port + i.
    url: str = "http://127.0.0.1:8100"
    replicas: int = Field(1, ge=1)  # how many servers arborl starts (launch); else url's count
    model: str = DEFAULT_MODEL  # the folder the servers loaded (the gateway renders with its tokenizer)
    served_name: str | None = None  # the name clients use; defaults to the model folder's name
    max_running: int = 16  # requests one server decodes at once (its batch limit)
    timeout_s: float = 600.0
    routing: Literal["affinity", "round_robin"] = "affinity"  # sessions stay on the replica with their KV
    publish: Literal["rolling", "all"] = "rolling"  # weight updates one replica at a time, or all at once
    # launch: arborl starts the servers itself (ops/engine_servers.py)
    launch: bool = False
    python: str = ""  # the python of the engine's own venv (default: the kind's, below)
    dtype: str = "auto"  # the server's --dtype (float32 on a CPU)
    max_model_len: int | None = None  # the server's context length (default: the model's)
    # of each GPU the server may take (vLLM --gpu-memory-utilization, SGLang --mem-fraction-static)
    gpu_memory_fraction: float | None = None
    devices: list[str] = Field(default_factory=list)  # CUDA_VISIBLE_DEVICES of replica i: devices[i] ("0", "1,2")
    extra_args: list[str] = Field(default_factory=list)  # more flags for every server

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.url.split(",") if u.strip()]


class VllmEngineConfig(ServerEngineConfig):
    """``engine.kind: vllm``: vLLM servers (started with ``--logprobs-mode processed_logprobs``)."""

    kind: Literal["vllm"] = "vllm"
    python: str = "/opt/vllm-venv/bin/python"


class SglangEngineConfig(ServerEngineConfig):
    """``engine.kind: sglang``: SGLang servers (their native ``/generate``)."""

    kind: Literal["sglang"] = "sglang"
    python: str = "/opt/sglang-venv/bin/python"


# One configuration model per engine kind; ``engine.kind`` says which (embedded when absent).
ENGINE_KINDS: dict[str, type[BaseModel]] = {
    "embedded": EmbeddedEngineConfig, "upstream": UpstreamEngineConfig, "vllm": VllmEngineConfig,
    "sglang": SglangEngineConfig,
}


def _engine_kind(value: Any) -> str:
    return str(value.get("kind", "embedded") if isinstance(value, dict) else getattr(value, "kind", "embedded"))


EngineConfig = Annotated[
    Annotated[EmbeddedEngineConfig, Tag("embedded")] | Annotated[UpstreamEngineConfig, Tag("upstream")]
    | Annotated[VllmEngineConfig, Tag("vllm")] | Annotated[SglangEngineConfig, Tag("sglang")],
    Discriminator(_engine_kind),
]


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Where the run's store is: empty for the run folder's store.sqlite (one machine), or a
    # PostgreSQL URL (postgresql://user@host:port/db) that several gateways and workers share.
    url: str = ""
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"  # SQLite's; PostgreSQL commits are durable anyway

    @field_validator("url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        from arborl.rollout.store import check_store_url

        check_store_url(url)
        return url


class RayPartSettings(BaseModel):
    """Where ``arborl up --ray`` places one part (ops/ray_placement.py)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = 0.0  # what the part's actor reserves (the part's own process uses what it uses)
    num_gpus: float = 0.0
    # A custom resource of the node it should run on (``ray start --resources '{"gpu-node": 1}'``):
    # while a live node has it, the part goes there; when none does (that node died), anywhere.
    prefer: str | None = None


class UpSettings(BaseModel):
    """What ``arborl up`` runs besides the gateway."""

    model_config = ConfigDict(extra="forbid")

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
    # ``arborl up --ray ADDRESS``: each part a Ray actor on the cluster at ADDRESS ("auto": the
    # local node's cluster), placed per part; ray_node_ip is this driver's own address there.
    ray_address: str | None = None
    ray_node_ip: str | None = None
    ray_parts: dict[Literal["gateway", "rollouts", "learner", "heldout"], RayPartSettings] = Field(
        default_factory=dict)


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


class ArborlConfig(BaseSettings):
    """The whole configuration; each field but run_dir is a section.

    A BaseSettings for its environment form (model_config), but built in code it reads nothing
    (settings_customise_sources): load_config layers the file and the environment.
    """

    model_config = SettingsConfigDict(
        extra="forbid", hide_input_in_errors=True,
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, env_parse_none_str="null",
    )

    run_dir: Path = Path("runs/default")
    engine: EngineConfig = Field(default_factory=EmbeddedEngineConfig)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    store: StoreConfig = Field(default_factory=StoreConfig)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    up: UpSettings = Field(default_factory=UpSettings)

    @model_validator(mode="after")
    def _fsdp_ranks_are_one_ray_placement(self) -> ArborlConfig:
        """Under ``arborl up --ray`` the fsdp or megatron ranks are children of the learner's
        command, on the node its actor was placed: the actor reserves a GPU for each rank or none
        (CPU ranks)."""
        placed = self.up.ray_parts.get("learner")
        learner = self.learner
        if placed and placed.num_gpus and learner.backend != "torch" and placed.num_gpus != learner.nproc:
            raise ValueError(f"learner.nproc is {learner.nproc} (one GPU per {learner.backend} rank, all on the "
                             f"learner's node): up.ray_parts.learner.num_gpus must be {learner.nproc}, or 0 for "
                             "ranks on the CPU")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        *other_sources: PydanticBaseSettingsSource, **named_sources: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# Sections whose model is chosen by a ``kind`` key: their errors' locations carry the kind.
_KINDS: dict[str, dict[str, type[BaseModel]]] = {"engine": ENGINE_KINDS}
SECTIONS = tuple(name for name, field in ArborlConfig.model_fields.items()
                 if _model_of(field.annotation) or name in _KINDS)


def _setting_path(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], type[BaseModel] | None]:
    """``loc`` as the user writes it (without the kind pydantic puts after a kind-chosen
    section: ``engine.upstream.model`` is the key ``engine.model``), and the model holding its
    last key (None when it is not in one)."""
    path: list[int | str] = []
    model: type[BaseModel] | None = ArborlConfig
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        path.append(part)
        field = model.model_fields.get(str(part)) if model else None
        kinds = _KINDS.get(str(part)) if model is ArborlConfig else None
        if kinds is not None and parts and str(parts[0]) in kinds:
            model = kinds[str(parts.pop(0))]
        else:
            model = _model_of(field.annotation) if field else None
    return (*path, *loc[-1:]), model


class SectionEnvironment(EnvSettingsSource):
    """The ``ARBORL_<SECTION>__<FIELD>`` variables of ``environ``, as a partial configuration."""

    def __init__(self, environ: Mapping[str, str]):
        super().__init__(ArborlConfig)
        self.env_vars = parse_env_vars(environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)
        self._refuse_unknown_sections()

    def _refuse_unknown_sections(self) -> None:
        # The env source only looks for the fields it knows, so a mistyped section would be ignored.
        problems = []
        for name in sorted(self.env_vars):
            if name.startswith(self.env_prefix.lower()) and ENV_DELIMITER in name:
                section = name[len(self.env_prefix):].split(ENV_DELIMITER, 1)[0]
                if section not in SECTIONS:
                    problems.append(f"{name.upper()}: unknown section {section}{_did_you_mean(section, SECTIONS)}")
        if problems:
            raise ConfigError("\n".join(problems))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Never a field from one variable of its own name (ARBORL_RUN_DIR, ARBORL_LEARNER are the
        # CLI's or nothing); a section's keys come from ARBORL_<SECTION>__<KEY> (explode_env_vars).
        return None, field_name, False

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        # YAML, as env values were before pydantic-settings (JSON is YAML too). Unparsable, the raw
        # string goes on, and validation names the key and the variable.
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        # The problem and its place only: YAML's own message quotes the line, which may hold a key.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or 'unparsable'}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of sections, not a {type(data).__name__}")
    return data


def _did_you_mean(key: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _setting_variables(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> list[str]:
    """The env variables that set the value at ``loc``: its own, its container's, or its parts'."""
    path = (ENV_PREFIX + ENV_DELIMITER.join(str(part) for part in loc)).lower()
    return sorted(name for name in environ if ENV_DELIMITER in name and (
        (lowered := name.lower()) == path or lowered.startswith(path + ENV_DELIMITER)
        or path.startswith(lowered + ENV_DELIMITER)))


def _describe(error: ErrorDetails, environ: Mapping[str, str]) -> str:
    loc, model = _setting_path(error["loc"])
    if error["type"] == "extra_forbidden":
        problem = "unknown setting" + _did_you_mean(str(loc[-1]), list(model.model_fields) if model else [])
        if len(error["loc"]) > len(loc):  # in a kind-chosen section: maybe a key of another kind
            kind, kinds = str(error["loc"][len(loc) - 1]), _KINDS[str(loc[0])]
            owners = [name for name, other in kinds.items() if name != kind and str(loc[-1]) in other.model_fields]
            if owners:
                problem = f"not a setting of kind {kind} (a setting of kind {', '.join(owners)})"
    elif error["type"] == "union_tag_invalid":
        loc = (*loc, "kind")
        problem = f"unknown kind {error['ctx']['tag']!r} (one of {error['ctx']['expected_tags']})"
    elif error["type"] == "value_error":
        problem = str(error["ctx"]["error"])  # the validator's own words, without pydantic's "Value error, "
    else:
        problem = error["msg"]
    variables = _setting_variables(loc, environ)
    where = ".".join(str(part) for part in loc)  # empty for a check across sections: its words name them
    return (f"{where}: " if where else "") + problem + (f", from {' and '.join(variables)}" if variables else "")


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None, *, defaults: dict[str, Any] | None = None,
) -> ArborlConfig:
    """``defaults`` (a command's own, like UP_DEFAULTS) < the file < env vars < ``overrides``.

    ``environ`` defaults to the process's environment. Raises ConfigError, naming every bad key.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = dict(defaults or {})
    if path is not None:
        data = _merge(data, _read_file(Path(path)))
    data = _merge(data, SectionEnvironment(environ)())
    data = _merge(data, overrides or {})
    try:
        return ArborlConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(error, environ) for error in exc.errors())) from None
