"""Configuration: every key is known (a typo in a file, an env var or a flag is an error naming it),
env values parse as documented, the precedence holds, and operator and API keys in configuration
are long enough and never echoed in an error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import BaseModel, ValidationError

from arborl.gateway.settings import GatewaySettings
from arborl.learner.settings import LearnerSettings
from arborl.ops.config import (
    ArborlConfig,
    ConfigError,
    EmbeddedEngineConfig,
    StoreConfig,
    UpSettings,
    UpstreamEngineConfig,
    load_config,
)
from arborl.rollout.settings import RolloutSettings

KEY = "k" * 16  # the shortest key the gateway accepts
ADMIN = "admin-key-0123456789abcdef"


# -- unknown keys ------------------------------------------------------------------------------


def test_a_typo_in_the_file_names_the_key_its_section_and_the_closest_setting(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown setting \(did you mean lr\?\)"):
        load_config(path, environ={})
    toml = tmp_path / "run.toml"
    toml.write_text("[rollout]\ngroup_sise = 8\n")
    with pytest.raises(ConfigError, match=r"rollout\.group_sise: unknown setting \(did you mean group_size\?\)"):
        load_config(toml, environ={})


def test_unknown_sections_and_keys_in_overrides_are_refused():
    with pytest.raises(ConfigError, match=r"lerner: unknown setting \(did you mean learner\?\)"):
        load_config(overrides={"lerner": {"lr": 1.0}}, environ={})
    with pytest.raises(ConfigError, match=r"gateway\.prot: unknown setting \(did you mean port\?\)"):
        load_config(overrides={"gateway": {"prot": 9000}}, environ={})
    with pytest.raises(ConfigError, match=r"up\.nonsense: unknown setting$"):  # nothing close: no guess
        load_config(overrides={"up": {"nonsense": 1}}, environ={})


def test_every_error_is_reported_at_once(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("engine:\n  max_runing: 4\nstore:\n  synchronus: FULL\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "engine.max_runing: unknown setting (did you mean max_running?)" in str(caught.value)
    assert "store.synchronus: unknown setting (did you mean synchronous?)" in str(caught.value)


def test_a_typo_in_an_env_var_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown setting \(did you mean lr\?\).*ARBORL_LEARNER__LRR"):
        load_config(environ={"ARBORL_LEARNER__LRR": "1.0"})
    with pytest.raises(ConfigError, match=r"ARBORL_LERNER__LR: unknown section lerner \(did you mean learner\?\)"):
        load_config(environ={"ARBORL_LERNER__LR": "1.0"})


@pytest.mark.parametrize("model", [ArborlConfig, EmbeddedEngineConfig, UpstreamEngineConfig, StoreConfig, UpSettings,
                                   GatewaySettings, LearnerSettings, RolloutSettings])
def test_every_settings_model_refuses_unknown_fields(model: type[BaseModel]):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model(no_such_setting=1)


def test_each_engine_kind_has_its_own_settings(tmp_path):
    """``engine.kind`` chooses the engine's settings model (embedded when absent); a key of another
    kind, or an unknown kind, is refused naming the key, wherever it came from."""
    assert isinstance(load_config(environ={}).engine, EmbeddedEngineConfig)
    file = tmp_path / "arborl.yaml"
    file.write_text("engine:\n  kind: upstream\n  upstream_url: http://127.0.0.1:9/v1\n  served_name: policy\n")
    upstream = load_config(file, environ={}).engine
    assert isinstance(upstream, UpstreamEngineConfig) and upstream.upstream_url == "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"^engine\.max_running: not a setting of kind upstream \(a setting of "
                                          r"kind embedded, vllm, sglang\), from ARBORL_ENGINE__MAX_RUNNING$"):
        load_config(file, environ={"ARBORL_ENGINE__MAX_RUNNING": "8"})
    with pytest.raises(ConfigError, match=r"^engine\.upstream_url: not a setting of kind embedded"):
        load_config(overrides={"engine": {"upstream_url": "http://x/v1"}}, environ={})
    with pytest.raises(ConfigError, match=r"^engine\.kind: unknown kind 'tgi' \(one of 'embedded', 'upstream', "
                                          r"'vllm', 'sglang'\)"):
        load_config(overrides={"engine": {"kind": "tgi"}}, environ={})
    with pytest.raises(ConfigError, match=r"engine\.upstrem_url: unknown setting \(did you mean upstream_url\?\)"):
        load_config(file, overrides={"engine": {"upstrem_url": "x"}}, environ={})


def test_the_clis_own_single_underscore_variables_are_neither_read_nor_refused():
    environ = {"ARBORL_ADMIN_TOKEN": "x", "ARBORL_SUPERVISOR_PID": "1", "ARBORL_CACHE": "/tmp/c",
               "ARBORL_RUN_DIR": "/elsewhere", "ARBORL_API_KEY": "y", "ARBORL_TORCH": "torch",
               "ARBORL_LEARNER": '{"lr": 5}'}
    assert load_config(environ=environ) == load_config(environ={})


def test_a_bad_value_names_the_key_and_where_it_came_from():
    with pytest.raises(ConfigError, match=r"gateway\.port: .*integer.*ARBORL_GATEWAY__PORT"):
        load_config(environ={"ARBORL_GATEWAY__PORT": "eighty"})


def test_a_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("learner: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken, environ={})
    listed = tmp_path / "list.yaml"
    listed.write_text("- learner\n")
    with pytest.raises(ConfigError, match="a mapping"):
        load_config(listed, environ={})


# -- env values and precedence ----------------------------------------------------------------


def test_env_values_scalars_by_type_and_containers_as_yaml_or_json():
    config = load_config(environ={
        "ARBORL_ENGINE__MAX_RUNNING": "8",
        "ARBORL_LEARNER__LR": "1e-5",
        "ARBORL_ROLLOUT__KEEP_WORKSPACES": "true",
        "ARBORL_ENGINE__SERVED_NAME": "policy",
        "ARBORL_ROLLOUT__TEMPERATURE": "null",
        "ARBORL_UP__TRAIN_DIFFICULTY": "[easy, medium]",  # YAML
        "ARBORL_ROLLOUT__SCAFFOLDS": '{"builtin": 3, "nop": 1}',  # JSON is YAML too
        "ARBORL_LEARNER__BETAS": "[0.8, 0.99]",
        "ARBORL_GATEWAY__ADMIN_KEYS__ALICE": ADMIN,  # a key of a dict, one variable each
        "arborl_gateway__port": "9001",  # names are case-insensitive
    }, defaults={"rollout": {"temperature": 0.7}})
    assert config.engine.max_running == 8 and config.learner.lr == 1e-5 and config.rollout.keep_workspaces
    assert config.engine.served_name == "policy" and config.rollout.temperature is None
    assert config.up.train_difficulty == ["easy", "medium"]
    assert config.rollout.scaffolds == {"builtin": 3.0, "nop": 1.0}
    assert config.learner.betas == (0.8, 0.99)
    assert config.gateway.admin_keys == {"alice": ADMIN} and config.gateway.port == 9001


def test_precedence_defaults_file_env_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner:\n  lr: 2.0\n  seed: 2\n  max_staleness: 2\n")
    config = load_config(
        path, overrides={"learner": {"seed": 4}},
        environ={"ARBORL_LEARNER__SEED": "3", "ARBORL_LEARNER__MAX_STALENESS": "3"},
        defaults={"learner": {"lr": 1.0, "warmup_steps": 1}},
    )
    assert config.learner.warmup_steps == 1  # the command's default, untouched by the rest
    assert config.learner.lr == 2.0  # file over defaults
    assert config.learner.max_staleness == 3  # env over file
    assert config.learner.seed == 4  # overrides over env
    # a section set in one layer keeps the other layers' keys of it
    assert config.learner.loss == "turn_gspo"


def test_a_config_built_in_code_reads_no_environment(monkeypatch):
    monkeypatch.setenv("ARBORL_ENGINE__MAX_RUNNING", "3")
    assert ArborlConfig().engine.max_running == 16
    assert load_config().engine.max_running == 3  # load_config reads the process's environment by default


def test_the_cli_prints_a_config_error_without_a_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gateway:\n  hots: 0.0.0.0\n")
    typo_in_file = "gateway.hots: unknown setting (did you mean host?)"
    typo_in_env = "gateway.prot: unknown setting (did you mean port?), from ARBORL_GATEWAY__PROT"
    for argv, extra_env, message in [
        (["train", "--config", str(path), "--run-dir", str(tmp_path)], {}, typo_in_file),
        (["connect", "claude-code"], {"ARBORL_GATEWAY__PROT": "1"}, typo_in_env),
    ]:
        done = subprocess.run([sys.executable, "-m", "arborl.ops.cli", *argv], capture_output=True, text=True,
                              env={**os.environ, **extra_env}, timeout=120, check=False)
        assert done.returncode != 0
        assert message in done.stderr and "Traceback" not in done.stderr


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "named"), [
    ({"admin_keys": {"alice": ""}}, r"admin_keys\.alice"),
    ({"admin_keys": {"alice": ADMIN, "bob": "short-key"}}, r"admin_keys\.bob"),
    ({"admin_token": "secret"}, "admin_token"),
    ({"admin_token": ""}, "admin_token"),
    ({"api_keys": [KEY, "sk-test"]}, r"api_keys\.1"),
    ({"api_keys": ["sk-with a-space-inside"]}, r"api_keys\.0"),
    ({"api_keys": ["sk-0123456789abcdef\n"]}, r"api_keys\.0"),
    ({"admin_token": "admin-0123456789\x00abc"}, "admin_token"),
    ({"admin_token": "\tadmin-0123456789abc"}, "admin_token"),
])
def test_short_or_unprintable_keys_are_refused_without_echoing_them(settings, named):
    with pytest.raises(ValidationError, match=named) as caught:
        GatewaySettings(**settings)
    secrets = [value for value in [settings.get("admin_token"), *settings.get("api_keys", []),
                                   *settings.get("admin_keys", {}).values()] if value]
    assert not any(secret in str(caught.value) for secret in secrets)
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(overrides={"gateway": settings}, environ={})
    assert not any(secret in str(caught.value) for secret in secrets)


def test_long_printable_keys_are_accepted():
    settings = GatewaySettings(admin_token=ADMIN, admin_keys={"alice": KEY}, api_keys=[KEY, KEY + "-2"])
    assert settings.admin_keys == {"alice": KEY} and settings.admin_token == ADMIN
    assert GatewaySettings().admin_token is None  # no key configured: none needed on loopback


def test_a_short_key_from_the_environment_is_refused_and_not_echoed():
    with pytest.raises(ConfigError, match=r"gateway\.admin_token.*16.*ARBORL_GATEWAY__ADMIN_TOKEN") as caught:
        load_config(environ={"ARBORL_GATEWAY__ADMIN_TOKEN": "hunter2"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
def test_learner_ranks_under_ray_reserve_a_gpu_each_or_none(backend: str):
    def config(num_gpus: float):
        return load_config(None, {"learner": {"backend": backend, "nproc": 2},
                                  "up": {"ray_parts": {"learner": {"num_gpus": num_gpus}}}})

    with pytest.raises(ConfigError, match=r"^learner.nproc is 2 .*up.ray_parts.learner.num_gpus must be 2"):
        config(1)
    assert config(2).up.ray_parts["learner"].num_gpus == 2
    assert config(0).learner.nproc == 2  # ranks on the CPU: the actor reserves no GPU
