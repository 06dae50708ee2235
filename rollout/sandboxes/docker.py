"""``docker``: a sandbox is one container, driven through the docker CLI.

The container is made from ``image`` at creation and lives until ``close``: its pid 1 is
docker's init (``--init``) holding ``sleep infinity``, and every command is a ``docker exec`` as
the sandbox's unprivileged user (``user``, default 1000:1000). What bounds what:

- processes: ``--pids-limit`` (``Limits.processes``) for the whole container;
- memory: ``--memory`` (``Limits.memory_mb``) for the whole container (a cgroup), not per process
  as in the process sandboxes; /tmp is a tmpfs of the same size;
- time: each ``run`` goes through coreutils ``timeout`` inside the container (killing the docker
  client would leave the command running: ``docker exec`` gives no handle on it), SIGTERM and
  SIGKILL ``kill_grace_s`` later; the wall limit kills everything and later calls raise
  ``SandboxExpired``;
- ``kill_all`` is ``kill -KILL -1`` run as the sandbox's user inside the container: every process
  of that user (the init is root's and stays). A ``SandboxProcess.kill`` does the same: no other
  handle on an exec'd process exists;
- capabilities: all dropped but CHOWN (to hand the seeded workspace to the user), and
  ``no-new-privileges``; the network is the host's (``network``, default ``host``), as bwrap's
  is, so the agent reaches the gateway at the URL it was given.

The environment is the protocol's (``sandbox_environment``): each variable goes to ``docker exec``
as ``-e NAME`` and its value through the client's own environment, so no value (an API key) is
ever on a command line. ``copy_in`` and ``copy_out`` stream a tar through ``docker exec -i``,
unpacked and packed by the sandbox's user (archive.py), as in the process sandboxes.

The image must hold bash, coreutils (``timeout``, ``tar``) and the scaffold the rollout runs.

The client is ``docker`` or anything that takes its command lines (``rollout.docker_cli``:
podman). Tested on real containers with podman (and runc) here, where Docker's own engine does
not run: the contract suite and tests/integration/test_docker_limits.py, through
tests/podman_docker; the command lines are unit-tested (tests/unit/test_docker_sandbox.py).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from .base import (
    DEFAULT_LIMITS,
    CommandResult,
    Limits,
    OutputCapture,
    OutputFile,
    PopenHandle,
    SandboxError,
    SandboxKind,
    SandboxUnavailable,
    WallClock,
    checked_workspace_at,
    new_sandbox_id,
    relative_path,
)
from .container import CONTAINER_HOME, ContainerSandbox

DOCKER_WORKSPACE = "/workspace"
DOCKER_HOME = CONTAINER_HOME
DEFAULT_USER = "1000:1000"
LABEL = "arborl.sandbox"
# How much longer than a command's own timeout the host waits for ``docker exec`` to return
# before it kills the sandbox's processes itself (the in-container ``timeout`` failed, say).
HOST_MARGIN_S = 5.0
# ``timeout`` exits with this when it stopped the command (and 128+9 after its SIGKILL).
TIMEOUT_EXIT_CODES = (124, 137)


@functools.cache
def docker_unavailable_reason(docker: str = "docker") -> str | None:
    """None when a docker engine answers this machine's docker CLI, else why not."""
    try:
        probe = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True,
                               text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the docker CLI could not run: {exc}"
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no docker engine answers: {(probe.stderr or probe.stdout).strip()[:300]}"
    return None


@dataclass(frozen=True)
class ContainerSpec:
    """What a sandbox's container is and how commands reach it: the docker command lines,
    pure (unit-tested without an engine)."""

    container: str
    sandbox_id: str
    image: str
    limits: Limits
    workspace_at: str = DOCKER_WORKSPACE
    user: str = DEFAULT_USER
    network: str = "host"

    def create_argv(self) -> list[str]:
        """``docker run`` arguments that make the container (after ``docker``)."""
        memory = f"{self.limits.memory_mb}m"
        return [
            "run", "--detach", "--init", "--name", self.container, "--label", f"{LABEL}={self.sandbox_id}",
            "--network", self.network,
            "--pids-limit", str(self.limits.processes),
            "--memory", memory, "--memory-swap", memory,
            "--ulimit", "core=0",
            "--cap-drop", "ALL", "--cap-add", "CHOWN",
            "--security-opt", "no-new-privileges",
            "--tmpfs", f"/tmp:rw,nosuid,size={memory},mode=1777",
            # the workspace and home as the container's own volumes: made by the engine, so an
            # image whose / is not writable (Fedora's is 0555) still has them; gone with it
            "--volume", self.workspace_at, "--volume", DOCKER_HOME,
            "--workdir", "/",
            "--entrypoint", "sleep",
            self.image, "infinity",
        ]  # fmt: skip

    def setup_script(self) -> str:
        """Run as root in the new container: the workspace and home, owned by the user."""
        folders = f"{self.workspace_at} {DOCKER_HOME}"
        # chmod first: once the folders are the user's, root without CAP_FOWNER may not change them
        return f"mkdir -p {folders} && chmod 0700 {folders} && chown {self.user} {folders}"

    def exec_argv(self, argv: Sequence[str], env: Mapping[str, str], *, cwd: str = ".", interactive: bool = False,
                  timeout_s: float | None = None) -> list[str]:
        """``docker exec`` arguments running ``argv`` as the user in the workspace (``cwd``
        relative to it); each variable of ``env`` by name only (its value travels in the
        client's environment); under ``timeout`` when ``timeout_s`` is given."""
        workdir = str(PurePosixPath(self.workspace_at) / relative_path(cwd))
        args = ["exec", *(["--interactive"] if interactive else []), "--user", self.user, "--workdir", workdir]
        for name in env:
            args += ["--env", name]
        args.append(self.container)
        if timeout_s is not None:
            grace = max(self.limits.kill_grace_s, 0.1)
            args += ["timeout", "--signal=TERM", f"--kill-after={grace:g}", f"{max(timeout_s, 0.001):g}"]
        return args + list(argv)


class DockerSandbox(ContainerSandbox):
    """One container per sandbox (see the module docstring)."""

    kind: SandboxKind = "docker"

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        image: str,
        limits: Limits = DEFAULT_LIMITS,
        source: Path | None = None,
        keep: bool = False,
        workspace_at: str | None = None,
        user: str = DEFAULT_USER,
        network: str = "host",
        docker: str = "docker",
    ):
        if not image:
            raise SandboxError("a docker sandbox needs an image (rollout.docker_image)")
        if source is not None and not Path(source).is_dir():
            raise SandboxError(f"source {source} is not a folder")
        self.limits = limits
        self.keep = keep
        self.docker = docker
        self.id = new_sandbox_id(name)
        workspace = checked_workspace_at(workspace_at or DOCKER_WORKSPACE, home=DOCKER_HOME)
        self.spec = ContainerSpec(container=f"arborl-{self.id}", sandbox_id=self.id, image=image, limits=limits,
                                  workspace_at=workspace, user=user, network=network)
        self.container = self.spec.container
        self.user = user
        self._workspace_at = self.spec.workspace_at
        self._closed = False
        self._removed = False
        self._clock = WallClock(self.id, limits.wall_s)
        self._lock = threading.Lock()
        # host-side scratch: the started processes' output files, the archives of copy_in/out
        self.dir = Path(root).absolute() / self.id
        self._started = 0
        problem = docker_unavailable_reason(docker)
        if problem is not None:
            raise SandboxUnavailable(problem)
        self.dir.mkdir(parents=True, mode=0o700)
        try:
            self._docker(self.spec.create_argv(), what="create the container")
            self._docker(["exec", "--user", "0", self.container, "sh", "-c", self.spec.setup_script()],
                         what="prepare the container")
            if source is not None:  # unpacked by the user, as every copy_in (root may not enter its folder)
                self.copy_in(Path(source), ".")
        except BaseException:
            self._remove()
            raise
        self._clock.start(self.kill_all)

    # -- the protocol ----------------------------------------------------------------------------

    @property
    def workspace_inside(self) -> str:
        return self._workspace_at

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> PopenHandle:
        self._check_open()
        with self._lock:
            self._started += 1
            output_path = self.dir / f"process-{self._started}.out"
        full_env = self.env(env)
        fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen([self.docker, *self.spec.exec_argv(list(argv), full_env, cwd=cwd or ".")],
                                    env=self._client_env(full_env), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=fd,
                                    stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
        finally:
            os.close(fd)
        return PopenHandle(proc, OutputFile(output_path, self.limits.output_bytes), self._stop_started)

    def _stop_started(self, client: subprocess.Popen) -> None:
        """A started process's ``kill``: every process of the sandbox's user goes (``docker
        exec`` gives no handle on the one inside), then its client."""
        self.kill_all()
        client.kill()

    def kill_all(self) -> None:
        """``kill -KILL -1`` as the user, inside: every process of the sandbox's user at once."""
        with self._lock:
            if self._removed:
                return
        probe = subprocess.run([self.docker, "exec", "--user", self.user, self.container, "kill", "-KILL", "-1"],
                               env=self._client_env({}), cwd=self.dir, capture_output=True, timeout=60, check=False)
        # kill -1 reports failure when there was nothing to kill; a missing container is an error
        if probe.returncode != 0 and b"No such container" in probe.stderr:
            raise SandboxError(f"sandbox {self.id}: its container is gone")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._clock.stop()
        self._remove()

    def __repr__(self) -> str:
        return f"DockerSandbox({self.id!r}, image={self.spec.image!r})"

    # -- internals -------------------------------------------------------------------------------

    def _remove(self) -> None:
        """The container goes (``keep``: it is stopped and stays, for a look afterwards)."""
        with self._lock:
            self._removed = True
        verb = ["kill", self.container] if self.keep else ["rm", "--force", "--volumes", self.container]
        subprocess.run([self.docker, *verb], env=self._client_env({}), cwd=self.dir, capture_output=True,
                       timeout=120, check=False)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # Every client call runs in the sandbox's scratch folder: podman's conmon leaves a file named
    # "oom" in its working folder when the container's cgroup kills for memory.

    def _client_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The docker client's environment: the sandbox's variables (sent by name) and what the
        client itself needs to find its engine, never the rest of the caller's."""
        own = {name: value for name, value in os.environ.items()
               if name.startswith("DOCKER_") or name in ("XDG_RUNTIME_DIR",)}
        config = Path.home() / ".docker"  # HOME is the sandbox's here: the client's own config, by its path
        if config.is_dir():
            own.setdefault("DOCKER_CONFIG", str(config))
        return {**env, **own, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _docker(self, args: list[str], *, what: str) -> None:
        result = subprocess.run([self.docker, *args], env=self._client_env({}), cwd=self.dir, capture_output=True,
                                text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise SandboxError(f"docker could not {what}: {result.stderr.strip()[-500:]}")

    def _exec(self, argv: list[str], *, env: Mapping[str, str] | None, cwd: str, stdin: bytes | IO[bytes] | None,
              timeout_s: float, stdout_to: IO[bytes] | None = None) -> CommandResult:
        self._check_open()
        started = time.monotonic()
        limit = min(timeout_s, self.seconds_left)
        full_env = self.env(env)
        args = self.spec.exec_argv(argv, full_env, cwd=cwd, interactive=stdin is not None, timeout_s=limit)
        proc = subprocess.Popen(
            [self.docker, *args], env=self._client_env(full_env), cwd=self.dir,
            stdin=subprocess.DEVNULL if stdin is None else (subprocess.PIPE if isinstance(stdin, bytes) else stdin),
            stdout=subprocess.PIPE if stdout_to is None else stdout_to, stderr=subprocess.PIPE,
            close_fds=True, start_new_session=True)
        captures = {name: OutputCapture(self.limits.output_bytes) for name in ("stdout", "stderr")}
        pumps = [threading.Thread(target=_pump, args=(stream, captures[name]), daemon=True)
                 for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)) if stream is not None]
        for pump in pumps:
            pump.start()
        if isinstance(stdin, bytes):
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin)
            except BrokenPipeError:
                pass
            proc.stdin.close()
        try:
            proc.wait(timeout=limit + self.limits.kill_grace_s + HOST_MARGIN_S)
            host_killed = False
        except subprocess.TimeoutExpired:  # the in-container timeout did not end it
            host_killed = True
            self.kill_all()
            proc.kill()
            proc.wait()
        for pump in pumps:
            pump.join(timeout=5)
        elapsed = time.monotonic() - started
        killed = host_killed or (proc.returncode in TIMEOUT_EXIT_CODES and elapsed >= limit) or (
            self._clock.passed and proc.returncode != 0)
        return CommandResult(exit_code=None if killed else proc.returncode, stdout=captures["stdout"].text(),
                             stderr=captures["stderr"].text(), timed_out=killed, seconds=elapsed)


def _pump(stream: io.BufferedReader, capture: OutputCapture) -> None:
    while chunk := stream.read1(65536):
        capture.add(chunk)
    stream.close()
