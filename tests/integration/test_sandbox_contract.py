"""The sandbox protocol's contract (rollout/sandboxes/base.py), against every kind that runs here.

Written only against the protocol: no host path of a sandbox is read or written, so the same
cases hold for a process sandbox and a container. ``local`` and ``bwrap`` run on this machine;
``docker`` runs where a container engine answers its client (``ARBORL_TEST_DOCKER_CLI``, default
docker; .ci/run gives podman through tests/podman_docker) with ``ARBORL_TEST_DOCKER_IMAGE``
(default debian:stable-slim; it must be present: nothing is pulled here); ``k8s`` where kubectl's
configuration reaches a cluster. What only a process sandbox
promises (uids, rlimits, /proc scans) is tested in test_sandbox.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from arborl.rollout.sandboxes import (
    SANDBOX_KINDS,
    Limits,
    PodOptions,
    Sandbox,
    SandboxClosed,
    SandboxError,
    SandboxExpired,
    bwrap_unavailable_reason,
    docker_unavailable_reason,
    k8s_unavailable_reason,
    make_sandbox,
)

LIMITS = Limits(wall_s=60, command_s=10, memory_mb=512, processes=64, output_bytes=4_000, kill_grace_s=0.3)
DOCKER_IMAGE = os.environ.get("ARBORL_TEST_DOCKER_IMAGE", "debian:stable-slim")
# the docker kind's client: docker, or podman through tests/podman_docker (what .ci/run sets up)
DOCKER_CLI = os.environ.get("ARBORL_TEST_DOCKER_CLI", "docker")
# the k8s kind runs where kubectl's configuration reaches a cluster (pods in ARBORL_TEST_K8S_NAMESPACE)
POD = PodOptions(image=DOCKER_IMAGE, namespace=os.environ.get("ARBORL_TEST_K8S_NAMESPACE", "default"))
UNAVAILABLE = {"local": None, "bwrap": bwrap_unavailable_reason(), "docker": docker_unavailable_reason(DOCKER_CLI),
               "k8s": k8s_unavailable_reason()}
KINDS = [pytest.param(kind, marks=pytest.mark.skipif(UNAVAILABLE[kind] is not None, reason=str(UNAVAILABLE[kind])))
         for kind in SANDBOX_KINDS]


@pytest.fixture
def root() -> Iterator[Path]:
    """A host folder other users can search (a local sandbox's uid must cross it)."""
    top = Path(tempfile.mkdtemp(prefix="arborl-contract-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def open_sandbox(kind: str, root: Path, **options) -> Sandbox:
    return make_sandbox(kind, root / "sandboxes", name="contract", image=DOCKER_IMAGE, docker_cli=DOCKER_CLI, pod=POD,
                        **{"limits": LIMITS, **options})


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def sandbox(kind: str, root: Path) -> Iterator[Sandbox]:
    with open_sandbox(kind, root) as box:
        yield box


def test_every_kind_is_known_and_an_unknown_one_is_refused(root: Path):
    assert set(SANDBOX_KINDS) == {"local", "bwrap", "docker", "k8s"}
    with pytest.raises(SandboxError, match="unknown sandbox kind 'vm'"):
        make_sandbox("vm", root, name="x")  # type: ignore[arg-type]


def test_run_reports_exit_codes_output_and_runs_in_the_workspace(sandbox: Sandbox):
    result = sandbox.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out, result.ok) == (3, "out\n", "err\n",
                                                                                              False, False)
    assert sandbox.run(["printf", "%s|", "a b", "c"]).stdout == "a b|c|"
    assert sandbox.run("pwd").stdout.strip() == sandbox.workspace_inside
    assert sandbox.run("mkdir -p sub/dir && echo hi > sub/dir/f").ok
    assert sandbox.run("pwd && cat f", cwd="sub/dir").stdout == f"{sandbox.workspace_inside}/sub/dir\nhi\n"
    assert sandbox.run("cat", stdin="fed\n").stdout == "fed\n"
    assert sandbox.run("kill -KILL $$").exit_code == 128 + 9  # a signal, as a shell reports it


def test_the_environment_is_fresh_and_the_callers_additions_arrive(sandbox: Sandbox, monkeypatch):
    monkeypatch.setenv("ARBORL_CONTRACT_SECRET", "must-not-leak")
    lines = sandbox.run("env", env={"EXTRA": "value with spaces\nand a newline"}).stdout
    assert "must-not-leak" not in lines
    assert "EXTRA=value with spaces\nand a newline" in lines
    env = sandbox.env({"X": "1"})
    assert env["HOME"] == sandbox.home_inside and env["X"] == "1" and env["ARBORL_SANDBOX_ID"] == sandbox.id
    assert sandbox.run('echo "$HOME"').stdout.strip() == sandbox.home_inside
    assert sandbox.run('test -w "$HOME" && test -w "$TMPDIR" && echo writable').stdout == "writable\n"


def test_a_command_past_its_timeout_is_killed_and_the_sandbox_goes_on(sandbox: Sandbox):
    started = time.monotonic()
    result = sandbox.run("sleep 30", timeout_s=0.5)
    assert (result.exit_code, result.timed_out) == (None, True)
    assert time.monotonic() - started < 20
    assert sandbox.run("echo still here").stdout == "still here\n"


def test_output_over_the_limit_keeps_its_head_and_tail(sandbox: Sandbox):
    result = sandbox.run("echo FIRST; head -c 20000 /dev/zero | tr '\\0' x; echo; echo LAST")
    assert result.stdout.startswith("FIRST\n") and result.stdout.endswith("LAST\n")
    assert "bytes omitted" in result.stdout and len(result.stdout) < LIMITS.output_bytes + 200


def test_a_started_process_can_be_polled_waited_for_read_and_killed(sandbox: Sandbox):
    done = sandbox.start(["bash", "-c", "echo to-out; echo to-err >&2; exit 4"])
    assert done.wait(timeout=20) == 4 and done.returncode == 4 and done.poll() == 4
    assert sorted(done.output().splitlines()) == ["to-err", "to-out"]

    running = sandbox.start(["bash", "-c", "echo started; exec sleep 300"], env={"WHO": "agent"})
    deadline = time.monotonic() + 20
    while "started" not in running.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.output() == "started\n"
    assert running.poll() is None and running.wait(timeout=0.2) is None
    running.kill()
    assert running.wait(timeout=20) is not None


def test_kill_all_ends_every_process_and_the_sandbox_stays_usable(sandbox: Sandbox):
    first = sandbox.start(["sleep", "300"])
    second = sandbox.start(["bash", "-c", "sleep 301 & wait"])
    time.sleep(0.3)
    sandbox.kill_all()
    assert first.wait(timeout=20) is not None and second.wait(timeout=20) is not None
    assert sandbox.run("echo after").stdout == "after\n"


def test_copy_in_puts_files_in_the_workspace_and_the_home(sandbox: Sandbox, tmp_path: Path):
    folder = tmp_path / "tests"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "test_x.py").write_text("def test_x(): pass\n")
    (folder / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (folder / "run.sh").chmod(0o755)
    sandbox.copy_in(folder, "hidden")
    single = tmp_path / "config.json"
    single.write_text('{"model": "policy"}')
    sandbox.copy_in(single, ".tool/settings.json", into="home")
    assert sandbox.run("hidden/run.sh && cat hidden/deep/test_x.py").stdout == "ran\ndef test_x(): pass\n"
    assert sandbox.run('cat "$HOME/.tool/settings.json"').stdout == '{"model": "policy"}'
    # written as the sandbox's own user: its commands can change and remove them
    assert sandbox.run("echo more >> hidden/run.sh && rm -r hidden/deep && echo ok").stdout == "ok\n"


def test_copy_in_refuses_paths_that_leave_the_workspace(sandbox: Sandbox, tmp_path: Path):
    src = tmp_path / "f"
    src.write_text("x")
    for dest in ("../outside", "/etc/passwd", "a/../../b"):
        with pytest.raises(SandboxError, match="stay inside"):
            sandbox.copy_in(src, dest)
    with pytest.raises(FileNotFoundError):
        sandbox.copy_in(tmp_path / "missing", "x")


def test_a_symlink_the_agent_left_cannot_redirect_copy_in(sandbox: Sandbox, root: Path, tmp_path: Path):
    # A host folder the agent may read but not write: copy_in writes with the agent's own
    # rights, from inside, so following the link gets it nothing it could not do itself.
    outside = root / "victim"
    outside.mkdir()
    outside.chmod(0o755)
    assert sandbox.run(f"ln -s {outside} tests").ok
    src = tmp_path / "payload"
    src.mkdir()
    (src / "test_a.py").write_text("planted\n")
    try:
        sandbox.copy_in(src, "tests")
    except SandboxError:
        pass  # refusing is fine too; writing through the link is not
    assert not (outside / "test_a.py").exists()


def test_copy_out_brings_files_and_folders_back(sandbox: Sandbox, tmp_path: Path):
    assert sandbox.run("mkdir -p out/sub && echo a > out/a.txt && echo b > out/sub/b.txt && echo one > one.txt "
                       "&& ln -s a.txt out/link && chmod 755 out/a.txt").ok
    sandbox.copy_out("out", tmp_path / "folder")
    assert (tmp_path / "folder/a.txt").read_text() == "a\n"
    assert (tmp_path / "folder/sub/b.txt").read_text() == "b\n"
    assert os.readlink(tmp_path / "folder/link") == "a.txt"
    assert os.stat(tmp_path / "folder/a.txt").st_mode & 0o777 == 0o755
    sandbox.copy_out("one.txt", tmp_path / "got/one-copy.txt")
    assert (tmp_path / "got/one-copy.txt").read_text() == "one\n"
    sandbox.copy_out(".", tmp_path / "whole")
    assert (tmp_path / "whole/one.txt").exists() and (tmp_path / "whole/out/sub/b.txt").exists()
    with pytest.raises(SandboxError, match="no such file"):
        sandbox.copy_out("missing.txt", tmp_path / "missing.txt")
    with pytest.raises(SandboxError, match="stay inside"):
        sandbox.copy_out("../..", tmp_path / "escape")


def test_copy_out_refuses_links_that_point_outside(sandbox: Sandbox, tmp_path: Path):
    assert sandbox.run("mkdir -p out && ln -s /etc/passwd out/passwd && ln -s ../../../x out/up").ok
    with pytest.raises(SandboxError, match="refused"):
        sandbox.copy_out("out", tmp_path / "dest")
    assert not (tmp_path / "dest/passwd").exists() and not (tmp_path / "x").exists()


def test_source_seeds_the_workspace(kind: str, root: Path, tmp_path: Path):
    source = tmp_path / "source"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("VALUE = 1\n")
    with open_sandbox(kind, root, source=source) as box:
        assert box.run("cat pkg/mod.py && echo changed > pkg/mod.py && cat pkg/mod.py").stdout == "VALUE = 1\nchanged\n"
    assert (source / "pkg" / "mod.py").read_text() == "VALUE = 1\n"  # a copy: the source is untouched
    # a staging folder the caller gives up: the same workspace (a process sandbox renames it in)
    with open_sandbox(kind, root, source=source, move_source=True) as box:
        assert box.run("cat pkg/mod.py && ls -A").stdout == "VALUE = 1\npkg\n"
        assert box.run("echo mine > pkg/new.py").ok  # the sandbox's own, writable


def test_close_is_final_and_idempotent(kind: str, root: Path):
    box = open_sandbox(kind, root)
    process = box.start(["sleep", "300"])
    box.close()
    box.close()
    assert process.wait(timeout=20) is not None
    with pytest.raises(SandboxClosed):
        box.run("true")
    with pytest.raises(SandboxClosed):
        box.start(["true"])


def test_the_wall_limit_kills_everything_and_ends_the_sandbox(kind: str, root: Path):
    # 3 s: long enough that making the sandbox and starting a process never take it all on a busy machine
    with open_sandbox(kind, root, limits=Limits(wall_s=3.0, command_s=30, memory_mb=512, processes=64)) as box:
        process = box.start(["sleep", "300"])
        result = box.run("sleep 30")
        assert result.timed_out and result.exit_code is None
        assert process.wait(timeout=20) is not None
        assert box.expired and box.seconds_left == 0
        with pytest.raises(SandboxExpired):
            box.run("true")
