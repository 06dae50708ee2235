"""The docker sandbox's command lines, checked without an engine (none runs on this machine; the
contract suite runs the real thing where one does)."""

from __future__ import annotations

import pytest

from arborl.rollout.sandboxes import Limits, SandboxError, SandboxUnavailable, make_sandbox
from arborl.rollout.sandboxes.docker import ContainerSpec, docker_unavailable_reason
from arborl.rollout.settings import RolloutSettings

LIMITS = Limits(wall_s=60, command_s=10, memory_mb=512, processes=64, kill_grace_s=0.5)
SPEC = ContainerSpec(container="arborl-s-1", sandbox_id="s-1", image="img:1", limits=LIMITS, workspace_at="/app")


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name]


def test_the_container_carries_the_limits_and_drops_privileges():
    argv = SPEC.create_argv()
    assert argv[:2] == ["run", "--detach"] and "--init" in argv
    assert argv[-2:] == ["img:1", "infinity"] and option(argv, "--entrypoint") == ["sleep"]
    assert option(argv, "--pids-limit") == ["64"]
    assert option(argv, "--memory") == ["512m"] and option(argv, "--memory-swap") == ["512m"]  # no swap beyond it
    assert option(argv, "--cap-drop") == ["ALL"] and option(argv, "--cap-add") == ["CHOWN"]
    assert option(argv, "--security-opt") == ["no-new-privileges"]
    assert option(argv, "--label") == ["arborl.sandbox=s-1"] and option(argv, "--name") == ["arborl-s-1"]
    assert option(argv, "--tmpfs") == ["/tmp:rw,nosuid,size=512m,mode=1777"]
    assert option(argv, "--network") == ["host"]
    assert option(argv, "--volume") == ["/app", "/home/agent"]  # the engine makes them, whatever / allows
    assert not any(arg.startswith(("-e", "--env")) for arg in argv)  # nothing of the host's environment


def test_the_setup_gives_the_workspace_and_home_to_the_user():
    # chmod before chown: root with only CHOWN may not change a folder it no longer owns (found
    # on a real engine, tests/integration/test_sandbox_contract.py on podman)
    assert SPEC.setup_script() == ("mkdir -p /app /home/agent && chmod 0700 /app /home/agent "
                                   "&& chown 1000:1000 /app /home/agent")


def test_exec_sends_variables_by_name_only_and_bounds_time_inside():
    env = {"OPENAI_API_KEY": "sk-secret", "PATH": "/usr/bin"}
    argv = SPEC.exec_argv(["bash", "-c", "pytest"], env, cwd="sub", interactive=True, timeout_s=7.5)
    assert argv[:2] == ["exec", "--interactive"]
    assert option(argv, "--user") == ["1000:1000"] and option(argv, "--workdir") == ["/app/sub"]
    assert option(argv, "--env") == ["OPENAI_API_KEY", "PATH"]
    assert "sk-secret" not in " ".join(argv)  # the value travels in the client's environment
    at = argv.index("arborl-s-1")
    assert argv[at + 1:] == ["timeout", "--signal=TERM", "--kill-after=0.5", "7.5", "bash", "-c", "pytest"]
    started = SPEC.exec_argv(["codex", "exec"], {}, cwd=".")
    assert started[-3:] == ["arborl-s-1", "codex", "exec"] and "--interactive" not in started
    with pytest.raises(SandboxError, match="stay inside"):
        SPEC.exec_argv(["true"], {}, cwd="../etc")


def test_without_an_engine_the_sandbox_says_so(tmp_path):
    reason = docker_unavailable_reason()
    if reason is None:
        pytest.skip("a docker engine answers here: the contract suite runs the real sandbox")
    with pytest.raises(SandboxUnavailable, match="docker"):
        make_sandbox("docker", tmp_path, name="x", image="img:1", limits=LIMITS)


def test_a_docker_sandbox_needs_an_image_and_a_workspace_of_its_own(tmp_path):
    with pytest.raises(SandboxError, match="needs an image"):
        make_sandbox("docker", tmp_path, name="x", limits=LIMITS)
    for bad in ("relative", "/", "/tmp", "/home/agent", "/app/../etc"):
        with pytest.raises(SandboxError, match="cannot be placed"):
            make_sandbox("docker", tmp_path, name="x", image="img:1", workspace_at=bad)
    with pytest.raises(ValueError, match="docker_image"):
        RolloutSettings(sandbox="docker")
    assert RolloutSettings(sandbox="docker", docker_image="img:1").docker_network == "host"
