"""The sandbox protocol: what a rollout needs from the place an agent's commands run.

A sandbox is a workspace (the task's files, writable by the agent), a private HOME (where a
scaffold's configuration goes) and a private tmp, plus the processes that run there under
``Limits``. The orchestrator, the agent runner and the verifier speak only this protocol: they
never touch a host path of a sandbox, so a sandbox can be a process tree on this machine
(``local``, ``bwrap``: sandboxes/process.py, sandboxes/bwrap.py) or a container elsewhere
(``docker``: sandboxes/docker.py; ``k8s``: a pod, sandboxes/k8s.py).

The contract every kind keeps (tests/integration/test_sandbox_contract.py checks it against
each kind that runs on the machine):

- ``run`` runs one command to completion and returns its exit code and output; a command past
  its timeout (default ``Limits.command_s``) is killed and reports ``exit_code=None,
  timed_out=True``. Output beyond ``Limits.output_bytes`` per stream keeps its head and tail.
- ``start`` starts a long-running process (a scaffold CLI) and returns a ``SandboxProcess``:
  poll, wait, kill, and its output (stdout and stderr together, bounded the same way).
- Every process gets a fresh environment (``env``): nothing of the caller's leaks in.
- ``copy_in`` writes host files into the workspace or the home *from inside the sandbox*, and
  ``copy_out`` reads workspace files back to the host through an archive checked on the host
  side: a symlink the agent left cannot turn either into a read or write outside the sandbox.
- ``kill_all`` ends every process of the sandbox; ``close`` does that and frees the sandbox
  (idempotent). After ``Limits.wall_s`` every process is killed and later calls raise
  ``SandboxExpired``; after ``close`` they raise ``SandboxClosed``.
- Paths given to ``run(cwd=...)``, ``copy_in`` and ``copy_out`` are relative to the workspace
  (or the home) and may not leave it.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol, Self

SandboxKind = Literal["local", "bwrap", "docker", "k8s"]
# Which of a sandbox's folders ``copy_in`` writes into.
Area = Literal["workspace", "home"]

# Tools are looked up on this PATH, never on the caller's: a PATH from the gateway's environment
# could point anywhere.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every process of a sandbox carries ``ARBORL_SANDBOX_ID=<id>`` in its environment.
MARKER_VAR = "ARBORL_SANDBOX_ID"


class SandboxError(RuntimeError):
    """A sandbox could not do what was asked (bad path, failed setup, a process that survived)."""


class SandboxUnavailable(SandboxError):
    """This kind of sandbox cannot run on this machine (no bwrap, namespaces refused, no engine)."""


class SandboxExpired(SandboxError):
    """The sandbox's wall-clock limit passed: its processes were killed; nothing more runs in it."""


class SandboxClosed(SandboxError):
    """The sandbox was closed."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 3600.0  # the sandbox's whole life, from creation
    command_s: float = 600.0  # one ``run`` unless it passes its own timeout_s
    memory_mb: int = 4096  # per process (RLIMIT_DATA in process sandboxes; see process.py for why not AS)
    processes: int = 512  # processes + threads of the whole sandbox at once
    output_bytes: int = 1_000_000  # captured per stream by ``run``; the middle is cut beyond it
    kill_grace_s: float = 1.0  # between SIGTERM and SIGKILL

    def __post_init__(self) -> None:
        for name in ("wall_s", "command_s", "memory_mb", "processes", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        if self.kill_grace_s < 0:
            raise ValueError(f"Limits.kill_grace_s must be >= 0, got {self.kill_grace_s}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class CommandResult:
    """What ``run`` returns. ``exit_code`` is None when the sandbox killed the command (its
    timeout or the sandbox's wall limit); a command that died of a signal by itself reports
    128 + the signal number, as a shell does."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class OutputCapture:
    """At most ``limit`` bytes of a stream: its head and its tail (a test summary lives at the
    end), with a marker saying how much was cut from the middle."""

    def __init__(self, limit: int):
        self.limit = limit
        self.tail_limit = limit // 2
        self.head_limit = limit - self.tail_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    def text(self) -> str:
        omitted = self.total - len(self.head) - len(self.tail)
        if omitted <= 0:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        marker = f"\n[... {omitted} bytes omitted: output over {self.limit} bytes ...]\n"
        return self.head.decode("utf-8", "replace") + marker + self.tail.decode("utf-8", "replace")


class OutputFile:
    """A started process's output, in a host file it writes: read through a descriptor of our
    own (sharing the child's would move the offset it writes at), head and tail within
    ``limit``; once the file is gone (the sandbox closed) the last reading stays."""

    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        self._last = ""

    def text(self) -> str:
        capture = OutputCapture(self.limit)
        try:
            with open(self.path, "rb") as output:
                while chunk := output.read(1 << 20):
                    capture.add(chunk)
        except FileNotFoundError:
            return self._last
        self._last = capture.text()
        return self._last


class PopenHandle:
    """The protocol's ``SandboxProcess`` over a host Popen whose output goes to a file: what the
    process sandboxes (the command itself) and docker (its ``docker exec`` client) hand out.
    ``stop`` is the kind's way of killing it and what it started; the handle then reaps it."""

    def __init__(self, proc: subprocess.Popen, output: OutputFile, stop: Callable[[subprocess.Popen], None]):
        self._proc = proc
        self._output = output
        self._stop = stop

    @property
    def returncode(self) -> int | None:
        code = self._proc.returncode
        return None if code is None else exit_code_of(code)

    def poll(self) -> int | None:
        self._proc.poll()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._stop(self._proc)
            self._proc.wait()

    def output(self) -> str:
        return self._output.text()


class WallClock:
    """A sandbox's wall-clock limit: ``Limits.wall_s`` from ``start`` (called once the sandbox is
    ready: seeding a large workspace is not the agent's time), when a watchdog calls the kind's
    ``kill_all`` and every later call raises SandboxExpired. ``passed``: the watchdog has fired
    (a command that ended then was killed by it, not by its own timeout)."""

    def __init__(self, sandbox_id: str, wall_s: float):
        self.sandbox_id = sandbox_id
        self.wall_s = wall_s
        self.deadline = time.monotonic() + wall_s
        self.passed = False
        self._timer: threading.Timer | None = None

    def start(self, on_expiry: Callable[[], None]) -> None:
        self.deadline = time.monotonic() + self.wall_s
        self._timer = threading.Timer(self.wall_s, self._fire, args=(on_expiry,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, on_expiry: Callable[[], None]) -> None:
        self.passed = True
        try:
            on_expiry()
        except (SandboxError, OSError, subprocess.TimeoutExpired):
            pass  # close() ends what is left, and reports

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @property
    def expired(self) -> bool:
        return self.passed or time.monotonic() >= self.deadline

    @property
    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class WallClocked:
    """The protocol's ``expired`` and ``seconds_left`` and the closed/expired check before each
    call, for a kind that keeps a ``WallClock`` in ``_clock`` and sets ``_closed`` on close."""

    _clock: WallClock
    _closed: bool

    @property
    def expired(self) -> bool:
        return self._clock.expired

    @property
    def seconds_left(self) -> float:
        return self._clock.seconds_left

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosed(f"sandbox {self._clock.sandbox_id} is closed")
        if self._clock.expired:
            raise SandboxExpired(f"sandbox {self._clock.sandbox_id} ran past its wall-clock limit of "
                                 f"{self._clock.wall_s} s")


def command_argv(command: str | Sequence[str]) -> list[str]:
    """``run``'s command as an argv: a string through ``bash -c``, a sequence as it is."""
    argv = ["bash", "-c", command] if isinstance(command, str) else list(command)
    if not argv:
        raise SandboxError("empty command")
    return argv


def relative_path(path: str) -> PurePosixPath:
    """A path inside the workspace (or home): relative, without '..' ("" and "." mean the folder itself)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise SandboxError(f"path {path!r} must be relative to the workspace and stay inside it")
    return pure


def checked_workspace_at(path: str, *, home: str) -> str:
    """Where a container's workspace appears (docker, k8s): an absolute, normalised folder of
    its own below / (not /tmp, the home or a system folder)."""
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts or str(pure) != path or len(pure.parts) < 2 or path in (
            "/tmp", home, "/proc", "/dev", "/sys", "/etc", "/usr"):
        raise SandboxError(f"a container's workspace cannot be placed at {path!r}: it must be an absolute folder "
                           "of its own")
    return path


def new_sandbox_id(name: str) -> str:
    """A fresh id for a sandbox named ``name``: the name made safe for paths and container
    names, then a random suffix (two sandboxes of one session never share an id)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64]
    return f"{cleaned or 'sandbox'}-{secrets.token_hex(4)}"


def exit_code_of(returncode: int) -> int:
    """A Popen return code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def sandbox_environment(sandbox_id: str, *, home: str, tmp: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The complete environment of a sandboxed process: a minimal base, then ``extra``, then the mark."""
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": home,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "USER": "agent",
        "LOGNAME": "agent",
        "SHELL": "/bin/bash",
        "TERM": "dumb",
    }
    env.update(extra or {})
    env[MARKER_VAR] = sandbox_id  # last: a caller's env cannot unmark a process
    return env


class SandboxProcess(Protocol):
    """A long-running process started in a sandbox (``Sandbox.start``)."""

    @property
    def returncode(self) -> int | None:
        """The exit code once it has exited (as a shell reports it), else None."""

    def poll(self) -> int | None:
        """The exit code if it has exited, else None; never blocks."""

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: until it exits); the exit code, or None if it still runs."""

    def kill(self) -> None:
        """Stop it and what it started, at once (SIGKILL). What else of the sandbox dies with it
        is the kind's to say; ``Sandbox.kill_all`` ends everything."""

    def output(self) -> str:
        """What it has written so far, stdout and stderr interleaved, at most ``Limits.output_bytes``
        (head and tail)."""


class Sandbox(Protocol):
    """Where a rollout's commands run. See the module docstring for the contract."""

    id: str
    limits: Limits

    @property
    def kind(self) -> SandboxKind:
        """Which kind of sandbox this is (for logs and reports: callers never branch on it)."""

    @property
    def workspace_inside(self) -> str:
        """The workspace as the sandbox's commands see it (an absolute path)."""

    @property
    def home_inside(self) -> str:
        """HOME as the sandbox's commands see it."""

    @property
    def expired(self) -> bool:
        """Whether the wall-clock limit has passed."""

    @property
    def seconds_left(self) -> float:
        """Seconds until the wall-clock limit."""

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The complete environment a process of this sandbox gets with ``extra``."""

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | bytes | None = None,
    ) -> CommandResult:
        """Run a command to completion: a string through ``bash -c``, a sequence as an argv,
        in the workspace (``cwd`` relative to it)."""

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> SandboxProcess:
        """Start a long-running process; only the wall limit bounds its time. Its stdin is empty."""

    def copy_in(self, src: Path, dest: str, *, into: Area = "workspace") -> None:
        """Copy a host file or folder to ``dest`` under the workspace or the home (a folder's
        contents merge into ``dest``), written from inside the sandbox."""

    def copy_out(self, src: str, dest: Path) -> None:
        """Copy a workspace file or folder to the host: a file to the path ``dest``, a folder's
        contents into the folder ``dest`` (created). Links pointing outside ``dest`` and special
        files are refused."""

    def kill_all(self) -> None:
        """Kill every process of the sandbox; raises SandboxError if one survives."""

    def close(self) -> None:
        """Kill everything and free the sandbox. Idempotent."""

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def system_tool(name: str) -> str:
    """The path of a tool on ``SYSTEM_PATH``; SandboxUnavailable if it is not installed."""
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        raise SandboxUnavailable(f"{name!r} is not installed (looked in {SYSTEM_PATH})")
    return found
