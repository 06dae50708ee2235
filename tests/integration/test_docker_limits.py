"""What a ``docker`` sandbox's container enforces, on a real engine (docker, or podman through
``ARBORL_TEST_DOCKER_CLI``; .ci/run sets up podman with tests/podman_docker and an image made
from Debian's mirror by tests/podman_image.sh). The protocol's own cases are the contract suite's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from arborl.rollout.sandboxes import Limits, docker_unavailable_reason, make_sandbox

DOCKER_IMAGE = os.environ.get("ARBORL_TEST_DOCKER_IMAGE", "debian:stable-slim")
DOCKER_CLI = os.environ.get("ARBORL_TEST_DOCKER_CLI", "docker")
UNAVAILABLE = docker_unavailable_reason(DOCKER_CLI)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.fixture
def sandbox(tmp_path: Path):
    with make_sandbox("docker", tmp_path, name="limits", image=DOCKER_IMAGE, docker_cli=DOCKER_CLI,
                      limits=Limits(wall_s=120, command_s=30, memory_mb=256, processes=32, kill_grace_s=0.3)) as box:
        yield box


def test_commands_run_unprivileged_in_folders_of_their_own(sandbox):
    result = sandbox.run('id -u; grep ^CapEff /proc/self/status; stat -c "%a %u" . "$HOME"')
    assert result.ok, result.stderr
    uid, caps, workspace, home = result.stdout.splitlines()
    assert uid == "1000" and caps.split()[1] == "0000000000000000"
    assert workspace == home == "700 1000"


def test_memory_is_bounded_for_the_whole_container(sandbox):
    result = sandbox.run("python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'")
    assert result.exit_code not in (0, None) and not result.stdout  # killed by the cgroup, not finished


def test_processes_are_bounded_for_the_whole_container(sandbox):
    result = sandbox.run("for i in $(seq 64); do sleep 5 & done; wait", timeout_s=20)
    assert "fork" in result.stderr and "Resource temporarily unavailable" in result.stderr
    assert sandbox.run("echo alive").stdout == "alive\n"  # the container survives its own fork storm
