"""Sandboxes for rollouts: where an agent's commands run, with limits, and how they are all killed.

A sandbox owns a scratch folder ``<root>/<name>-<random>/`` holding ``workspace/`` (the task's
files, writable by the agent), ``home/`` (a private HOME: adapters write the scaffold's
configuration there) and ``tmp/``. Commands run with ``run`` (a shell string through
``bash -c``, or an argv) or ``popen`` (a long-running scaffold process); ``close`` kills
everything the sandbox started and removes the scratch folder.

Invariants, for both kinds:

- **Nothing is inherited.** Every process gets a fresh environment (PATH, HOME, TMPDIR, LANG,
  ... plus what the caller passes): the gateway's admin token, API keys and the store's location
  never leak in. File descriptors are not inherited either (``close_fds``).
- **Every process is the sandbox's, and close() leaves none behind.** When arborl runs as root
  (the normal case in CI and on rollout hosts), each sandbox leases its own unprivileged uid from
  a pool (``UID_POOL_BASE`` ...; a lock file per uid in a root-only folder keeps concurrent
  sandboxes, in this process or another, on different uids) and every command drops to it
  (``setpriv --reuid --regid --clear-groups --no-new-privs``). A process cannot shed its uid, so
  ``close`` kills with ``kill(-1, SIGKILL)`` sent *as that uid* -- the kernel walks the process
  list under its lock, so even a fork bomb cannot outrun it -- and then checks ``/proc`` until no
  process runs as the uid. Every process also carries ``ARBORL_SANDBOX_ID=<id>`` in its
  environment; the ``/proc`` scan kills what carries it (the root-owned bwrap helpers, and the
  sandbox's processes when arborl is not root). Each command has its own session and process
  group, and a timeout kills the group (SIGTERM, then SIGKILL after ``Limits.kill_grace_s``);
  under ``local`` the background jobs and daemons of a command that exits by itself live on, as
  in a terminal, until ``close``.
- **The process limit is real.** RLIMIT_NPROC is not enforced for root (the kernel exempts uid 0)
  and counts processes per uid, so limiting root's children with it stops nothing; a dedicated
  uid per sandbox makes it exact: ``Limits.processes`` bounds the processes and threads of the
  whole sandbox at once (all its commands together). A pids cgroup would do the same, but cgroup
  folders are rarely writable inside containers, and uids work everywhere root does. A killed
  process counts until it is reaped; orphans are reaped by the pid-1 init (bwrap's own init for
  bwrap commands), and an init that reaps slowly (some container inits poll about once a second)
  leaves the sandbox at its limit for that long after a fork bomb.
- **Memory** is RLIMIT_DATA per process (heap and private writable mappings), not RLIMIT_AS:
  V8 reserves gigabytes of address space it never touches, so Node-based agent CLIs (Claude
  Code, Codex, OpenCode, Cline) abort at start under a 512 MB RLIMIT_AS ("Failed to reserve
  virtual memory for CodeRange") but run under RLIMIT_DATA, which still stops a real hog. It is
  per process, so a sandbox's total is at most ``memory_mb * processes``.
- **Time.** ``Limits.command_s`` bounds each ``run``; ``Limits.wall_s`` bounds the sandbox's whole
  life: at the deadline a watchdog kills every process (``popen``'d scaffolds included) and later
  calls raise ``SandboxExpired``.

Files the host writes into ``workspace`` or ``home`` after creation (``task.materialize``, an
adapter's configuration) belong to root; ``hand_over()`` gives them to the sandbox's uid, and
``run``/``popen`` call it before the first command. ``copy_in`` writes as the sandbox's uid
(it streams a tar into the sandbox), so an agent's symlink in the workspace cannot make the host
write outside it.

``local``: commands run on the host filesystem. It isolates the environment, processes and
limits, and -- as root -- Unix permissions: the sandbox's uid cannot read other sandboxes'
workspaces (mode 0700, other uids) nor files readable only by root (keep the admin token 0600).
It does NOT hide the filesystem: the agent sees and can read every world-readable file (the
source tree, a store.sqlite with mode 0644, other users' homes) and can write wherever "other"
may write (/tmp, /dev/shm). Use ``bwrap`` for untrusted agents. As root, every folder above the
scratch folder must be searchable by others (o+x) so the uid can reach its workspace; pytest's
``tmp_path`` (under the 0700 /tmp/pytest-of-root) is not. When arborl is not root there is no
uid to drop to: RLIMIT_NPROC then counts all the user's processes (the sandbox gets its limit
on top of what already runs), and ``close`` relies on process groups and the environment mark,
which a process can shed by re-executing with a clean environment.

``bwrap``: every command runs under bubblewrap with a read-only view of the system (/usr, /etc,
the /bin and /lib links) plus ``expose`` paths, the workspace at ``/workspace`` (or at
``workspace_at``, the folder a task takes as its working directory: Harbor's ``/app``) and the
home at ``/home/agent`` (writable), a private tmpfs ``/tmp`` (at most ``memory_mb``), a fresh ``/proc``
and ``/dev``, and new pid, ipc, uts and cgroup namespaces. It sees no other workspace, no run
folder and nothing of the caller's root but its own two folders. The network namespace is
shared on purpose: the agent must reach the gateway on 127.0.0.1 (so it can also reach anything
else listening there; keep the admin API behind its token). Each command is its own pid
namespace: when the command ends, everything it started in the background ends with it
(``popen`` a long-lived process instead), and a timeout kills the namespace at once (its init
ignores SIGTERM from outside, so there is no grace period). As root, bwrap itself runs
privileged (no user namespace needed) and ``setpriv`` inside drops to the sandbox's uid;
otherwise bwrap runs unprivileged, which needs user namespaces. ``--die-with-parent`` ties each command to the thread
that started it: start long-lived ``popen`` processes from a thread that outlives them.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, ClassVar, Literal, Self

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

SandboxKind = Literal["local", "bwrap"]

# Tools are looked up on this PATH, never on the caller's: a PATH from the gateway's environment
# could point anywhere.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MARKER_VAR = "ARBORL_SANDBOX_ID"
# The uid pool: in the range systemd documents as unused (between the nspawn container range,
# which ends at 1879048191, and 2^31), so no login user, container or DynamicUser has these.
UID_POOL_BASE = 1_900_000_000
UID_POOL_SIZE = 4096
# After a command exits, how long to keep reading its output: a background process it left
# holding the pipes must not hold ``run`` until the timeout.
DRAIN_AFTER_EXIT_S = 0.2
BWRAP_WORKSPACE = "/workspace"
BWRAP_HOME = "/home/agent"
# Where a bwrap workspace may not go: the system it sees, and the mounts it makes itself.
_RESERVED_INSIDE = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/dev", "/tmp",
                    "/home")


class SandboxError(RuntimeError):
    """A sandbox could not do what was asked (bad path, failed setup, a process that survived)."""


class SandboxUnavailable(SandboxError):
    """This kind of sandbox cannot run on this machine (no bwrap, namespaces refused, no setuid)."""


class SandboxExpired(SandboxError):
    """The sandbox's wall-clock limit passed: its processes were killed; nothing more runs in it."""


class SandboxClosed(SandboxError):
    """The sandbox was closed."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 3600.0  # the sandbox's whole life, from creation
    command_s: float = 600.0  # one ``run`` unless it passes its own timeout_s
    memory_mb: int = 4096  # RLIMIT_DATA per process (see the module docstring for why not AS)
    processes: int = 512  # processes + threads of the whole sandbox at once (RLIMIT_NPROC)
    output_bytes: int = 1_000_000  # captured per stream by ``run``; the middle is cut beyond it
    kill_grace_s: float = 1.0  # between SIGTERM and SIGKILL

    def __post_init__(self) -> None:
        for name in ("wall_s", "command_s", "memory_mb", "processes", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        if self.kill_grace_s < 0:
            raise ValueError(f"Limits.kill_grace_s must be >= 0, got {self.kill_grace_s}")


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


# -- helpers: /proc, output capture, paths -----------------------------------------------------


def _relative(path: str) -> PurePosixPath:
    """A path inside the workspace: relative, without '..' ("" and "." mean the workspace)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise SandboxError(f"path {path!r} must be relative to the workspace and stay inside it")
    return pure


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64]
    return cleaned or "sandbox"


def _read_status(pid: int) -> tuple[str, set[int]] | None:
    """(state letter, {real, effective, saved, fs uid}) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    state, uids = "?", set()
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("Uid:"):
            uids = {int(value) for value in line.split()[1:]}
            break  # Uid comes after State
    return state, uids


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return entry in handle.read().split(b"\0")
    except OSError:
        return False


def _sandbox_pids(uid: int | None, marker: bytes | None) -> list[int]:
    """Live (non-zombie) processes that run as ``uid`` or carry the marker in their environment."""
    return _sandbox_pids_among((int(name) for name in os.listdir("/proc") if name.isdigit()), uid, marker)


def _sandbox_pids_among(pids: Iterable[int], uid: int | None, marker: bytes | None) -> list[int]:
    own = os.getpid()
    found = []
    for pid in pids:
        if pid == own:
            continue
        status = _read_status(pid)
        if status is None or status[0] in ("Z", "X"):
            continue
        if (uid is not None and uid in status[1]) or (marker is not None and _environ_has(pid, marker)):
            found.append(pid)
    return found


def _signal_verified(pid: int, sig: int, uid: int | None, marker: bytes | None) -> None:
    """Signal a process a /proc scan found, through a pidfd opened and then checked again: had
    it exited and its pid gone to another process since the scan, the check fails and nothing is
    sent (root must not kill a stranger)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _sandbox_pids_among([pid], uid, marker):
            signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _tasks_of_uid(uid: int) -> int:
    """Processes + threads whose real uid is ``uid`` (what RLIMIT_NPROC counts)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


class _Capture:
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


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Only while the leader is unreaped: its pid (= the group id) cannot have been reused then.
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the process has exited, without reaping it (a zombie keeps its pid and group)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped by another thread's poll()
        return True


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """chown everything under ``top`` (itself included) to uid:gid, never following a symlink.

    ``os.fwalk`` holds a descriptor of each folder it visits and chowns names relative to it, so
    a sandbox process that swaps a folder for a symlink mid-walk cannot redirect it outside."""
    os.chown(top, uid, gid, follow_symlinks=False)
    for _, dirs, files, dir_fd in os.fwalk(top):
        for name in dirs + files:
            try:
                if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_uid != uid:
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass


def _remove_tree(path: Path) -> None:
    def make_writable_and_retry(function, failed, _exc):
        # a non-root owner may have left folders without write or search permission
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            function(failed)
        except OSError:
            pass

    if not os.path.lexists(path):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _tool(name: str) -> str:
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        raise SandboxUnavailable(f"{name!r} is not installed (looked in {SYSTEM_PATH})")
    return found


# -- the uid pool (root only) ------------------------------------------------------------------


def _uid_pool_dir() -> Path:
    parent = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    folder = parent / "arborl-sandbox-uids"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SandboxError(f"cannot create the uid pool folder {folder}: {exc}") from exc
    info = os.lstat(folder)
    # Anyone else able to write here could hold our locks or plant symlinks.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise SandboxError(f"{folder} must be a folder owned by uid {os.geteuid()} with mode 0700")
    return folder


class _UidLease:
    """One uid of the pool, held (flock on its lock file) until ``release`` or process death."""

    def __init__(self) -> None:
        folder = _uid_pool_dir()
        start = secrets.randbelow(UID_POOL_SIZE)
        for step in range(UID_POOL_SIZE):
            uid = UID_POOL_BASE + (start + step) % UID_POOL_SIZE
            fd = os.open(folder / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            # Left over from a sandbox whose owner died without closing it: they would count
            # against this sandbox's process limit.
            for pid in _sandbox_pids(uid, None):
                _signal_verified(pid, signal.SIGKILL, uid, None)
            return
        raise SandboxError(f"all {UID_POOL_SIZE} sandbox uids are in use")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _uid_map_covers(first: int, count: int) -> bool:
    try:
        lines = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return True
    for index in range(0, len(lines) - 2, 3):
        inside, length = int(lines[index]), int(lines[index + 2])
        if inside <= first and first + count <= inside + length:
            return True
    return False


@functools.cache
def _uid_switch_problem() -> str | None:
    """None if this (root) process can run a command as a pool uid; else why not."""
    if not _uid_map_covers(UID_POOL_BASE, UID_POOL_SIZE):
        return f"uids {UID_POOL_BASE}..{UID_POOL_BASE + UID_POOL_SIZE - 1} are not mapped in this user namespace"
    uid = UID_POOL_BASE + UID_POOL_SIZE - 1
    try:
        probe = subprocess.run(
            [*_setpriv_argv(uid, uid), "--", "true"],
            env={"PATH": SYSTEM_PATH},
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, SandboxUnavailable, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if probe.returncode != 0:
        return f"setpriv to uid {uid} failed: {probe.stderr.decode(errors='replace').strip()}"
    return None


def _setpriv_argv(uid: int, gid: int) -> list[str]:
    return [
        _tool("setpriv"),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        # no setuid binary (su, mount, ...) can give anything back
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
    ]


# -- the sandbox -------------------------------------------------------------------------------


class Sandbox(ABC):
    """A workspace, a private HOME, and processes that run there under ``limits``.

    ``workspace`` and ``home`` are host paths (for the caller to seed, read and inspect);
    ``workspace_inside`` and ``home_inside`` are the same folders as the sandbox's commands see
    them (equal for ``local``).
    """

    kind: ClassVar[SandboxKind]

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        limits: Limits = Limits(),
        source: Path | None = None,
        keep: bool = False,
    ):
        self.limits = limits
        self.keep = keep
        self.id = f"{_safe_name(name)}-{secrets.token_hex(4)}"
        self._marker = f"{MARKER_VAR}={self.id}".encode()
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen] = []
        self._closed = False
        self._expired = False
        self._handed_over = False
        self._deadline = time.monotonic() + limits.wall_s
        self._lease: _UidLease | None = None
        if source is not None and not Path(source).is_dir():
            raise SandboxError(f"source {source} is not a folder")
        self._check_available()

        if os.geteuid() == 0:
            problem = _uid_switch_problem()
            if problem is not None:
                # As root without a uid to drop to, RLIMIT_NPROC is not enforced: a fork bomb
                # would have the machine. Refuse rather than run unprotected.
                raise SandboxUnavailable(f"running as root but cannot drop to a sandbox uid: {problem}")
            self._lease = _UidLease()
            self.uid = self.gid = self._lease.uid
        else:
            self.uid, self.gid = os.getuid(), os.getgid()

        self.dir = Path(root).absolute() / self.id
        created = False
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            # root-owned and not listable: the sandbox's uid can reach its folders but cannot
            # rename them (say, swap the workspace for a symlink the host would then follow)
            self.dir.mkdir(mode=0o711)
            created = True
            os.chmod(self.dir, 0o711)
            self.workspace = self.dir / "workspace"
            self.home = self.dir / "home"
            self.tmp = self.dir / "tmp"
            for folder in (self.workspace, self.home, self.tmp):
                folder.mkdir(mode=0o700)
            if source is not None:
                shutil.copytree(source, self.workspace, symlinks=True, dirs_exist_ok=True)
            self._prepare()
            for folder in (self.workspace, self.home, self.tmp):
                _chown_tree(folder, self.uid, self.gid)
        except BaseException:
            if created:
                _remove_tree(self.dir)
            self._release()
            raise
        # the wall clock starts once the workspace is ready: copying a large source is not the agent's time
        self._deadline = time.monotonic() + limits.wall_s
        self._watchdog = threading.Timer(limits.wall_s, self._on_wall_limit)
        self._watchdog.daemon = True
        self._watchdog.start()

    # -- what a kind provides -------------------------------------------------------------------

    @property
    @abstractmethod
    def workspace_inside(self) -> str: ...

    @property
    @abstractmethod
    def home_inside(self) -> str: ...

    @property
    @abstractmethod
    def tmp_inside(self) -> str: ...

    def _check_available(self) -> None:  # noqa: B027 (an optional hook: a no-op unless overridden)
        """Raise SandboxUnavailable if this kind cannot run here."""

    def _prepare(self) -> None:  # noqa: B027 (an optional hook)
        """Extra set-up of the scratch folder, before it is handed to the sandbox's uid."""

    @abstractmethod
    def _wrap(self, argv: list[str], cwd: PurePosixPath) -> tuple[list[str], Path]:
        """The host argv that runs ``argv`` in the sandbox with the limits applied, and the host
        folder to start it in."""

    # -- the public API -------------------------------------------------------------------------

    @property
    def switches_uid(self) -> bool:
        """True when commands run as a uid of their own (arborl is root)."""
        return self._lease is not None

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self._deadline

    @property
    def seconds_left(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The complete environment of a sandboxed process: a minimal base, then ``extra``."""
        env = {
            "PATH": SYSTEM_PATH,
            "HOME": self.home_inside,
            "TMPDIR": self.tmp_inside,
            "LANG": "C.UTF-8",
            "USER": "agent",
            "LOGNAME": "agent",
            "SHELL": "/bin/bash",
            "TERM": "dumb",
        }
        env.update(extra or {})
        env[MARKER_VAR] = self.id  # last: a caller's env cannot unmark a process
        return env

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | bytes | None = None,
    ) -> CommandResult:
        """Run a command to completion: a string through ``bash -c`` (not a login shell, so
        /etc/profile cannot reset the PATH the caller chose), a sequence as an argv. ``cwd`` is
        relative to the workspace. The command runs in a process group of its own: at its
        timeout (default ``limits.command_s``, never past the wall limit) the group gets SIGTERM,
        then SIGKILL (under ``bwrap``, its pid namespace is killed at once). When it exits by
        itself, its background jobs and daemons live on under ``local``, as in a terminal, until
        ``close``; under ``bwrap`` they end with the command's pid namespace. Output is captured
        until the command exits and its pipes close, at most ``DRAIN_AFTER_EXIT_S`` more (a
        background job holding the pipes does not hold ``run``)."""
        return self._run(command, timeout_s=timeout_s, env=env, cwd=cwd, stdin=stdin)

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: int | IO | None = subprocess.DEVNULL,
        stdout: int | IO | None = subprocess.DEVNULL,
        stderr: int | IO | None = subprocess.DEVNULL,
    ) -> subprocess.Popen:
        """Start a long-running process (a scaffold CLI) in the sandbox, in its own session,
        under the same limits; only the wall limit bounds its time. The sandbox tracks it and
        kills it (and all it started) on ``close``. Standard streams default to /dev/null."""
        self._check_open()
        self._hand_over_once()
        host_argv, host_cwd = self._wrap(list(argv), _relative(cwd or "."))
        with self._lock:
            self._check_open()
            proc = subprocess.Popen(
                host_argv,
                cwd=host_cwd,
                env=self.env(env),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                close_fds=True,
                umask=0o022,
            )
            self._processes.append(proc)
        return proc

    def copy_in(self, src: Path, dest: str) -> None:
        """Copy a host file or folder to ``dest`` in the workspace (a folder's contents merge
        into ``dest``). The files are written by the sandbox's own uid, from inside it: a
        symlink the agent left in the workspace cannot redirect the write outside."""
        src = Path(src)
        rel = _relative(dest)
        if not src.exists():
            raise FileNotFoundError(src)
        if src.is_dir():
            target, arcname = rel, "."
        else:
            if not rel.name:
                raise SandboxError(f"copy_in of the file {src} needs a destination file name, got {dest!r}")
            target, arcname = rel.parent, rel.name
        with tempfile.TemporaryFile(dir=self.dir) as archive:
            with tarfile.open(fileobj=archive, mode="w") as tar:
                tar.add(src, arcname=arcname)
            archive.seek(0)
            script = 'mkdir -p -- "$1" && exec tar -x --no-same-owner --preserve-permissions -f - -C "$1"'
            result = self._run(
                ["bash", "-c", script, "copy_in", str(target)],
                timeout_s=None,
                env=None,
                cwd=None,
                stdin=archive,
            )
        if result.exit_code != 0:
            raise SandboxError(f"copy_in {src} -> {dest} failed ({result.exit_code}): {result.stderr.strip()}")

    def hand_over(self) -> None:
        """Give every file in the workspace and home to the sandbox's uid: files the host wrote
        there after creation are root's, and the sandbox's commands could not change them. A
        no-op when arborl is not root. Call after writing into the workspace from the host."""
        if self.switches_uid:
            for folder in (self.workspace, self.home):
                _chown_tree(folder, self.uid, self.gid)
        self._handed_over = True

    def _hand_over_once(self) -> None:
        if not self._handed_over:
            self.hand_over()

    def processes(self) -> list[int]:
        """Pids of the sandbox's live processes (by uid when it has its own, and by the
        environment mark), found by scanning /proc."""
        return _sandbox_pids(self.uid if self.switches_uid else None, self._marker)

    def kill_all(self) -> None:
        """Kill every process of the sandbox: SIGTERM, up to ``kill_grace_s`` for them to exit,
        then SIGKILL until a /proc scan finds none. Raises SandboxError if one survives."""
        with self._lock:
            tracked = list(self._processes)
        if any(proc.poll() is None for proc in tracked) or self.processes():
            self._signal_everything(signal.SIGTERM, tracked)
            deadline = time.monotonic() + self.limits.kill_grace_s
            while time.monotonic() < deadline and (
                any(proc.poll() is None for proc in tracked) or self.processes()
            ):
                time.sleep(0.02)
            for attempt in range(200):
                self._signal_everything(signal.SIGKILL, tracked)
                survivors = self.processes()
                if not survivors:
                    break
                time.sleep(min(0.005 * (attempt + 1), 0.05))
            else:
                raise SandboxError(f"sandbox {self.id}: processes {survivors} survived SIGKILL")
        for proc in tracked:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        with self._lock:
            self._processes = [proc for proc in self._processes if proc.returncode is None]

    def close(self) -> None:
        """Kill every process the sandbox started (grandchildren, daemons that setsid'd or
        double-forked included), then remove the scratch folder unless ``keep``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._watchdog.cancel()
        try:
            self.kill_all()
        finally:
            if self.keep:
                # a later sandbox may lease the same uid: it must not read this one's files
                if self.switches_uid and self.dir.exists():
                    _chown_tree(self.dir, os.geteuid(), os.getegid())
            else:
                _remove_tree(self.dir)
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, uid={self.uid}, dir={str(self.dir)!r})"

    # -- internals ------------------------------------------------------------------------------

    def _release(self) -> None:
        if self._lease is not None:
            self._lease.release()

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosed(f"sandbox {self.id} is closed")
        if self.expired:
            raise SandboxExpired(f"sandbox {self.id} ran past its wall-clock limit of {self.limits.wall_s} s")

    def _on_wall_limit(self) -> None:
        self._expired = True
        try:
            self.kill_all()
        except SandboxError:
            pass  # close() tries again and reports

    def _signal_everything(self, sig: int, tracked: Iterable[subprocess.Popen]) -> None:
        for proc in tracked:
            _signal_group(proc, sig)
        if self._lease is not None:
            self._signal_as_uid(sig)
        for pid in self.processes():
            _signal_verified(pid, sig, self.uid if self.switches_uid else None, self._marker)

    def _signal_as_uid(self, sig: int) -> None:
        """kill(-1, sig) from a process running as the sandbox's uid: every process of that uid,
        in one pass the kernel makes under the task-list lock (a fork bomb cannot outrun it)."""
        # kill(-1) from root would signal every process on the machine: refuse any uid outside
        # the pool here, and have the shell check its own uids before it sends anything.
        if not UID_POOL_BASE <= self.uid < UID_POOL_BASE + UID_POOL_SIZE:
            raise SandboxError(f"refusing to kill(-1) as uid {self.uid}, which is not a sandbox uid")
        guarded = f'[ "$UID" = {self.uid} ] && [ "$EUID" = {self.uid} ] && kill -s {signal.Signals(sig).name[3:]} -1'
        subprocess.run(
            [_tool("bash"), "-c", guarded],
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env={"PATH": SYSTEM_PATH},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            check=False,
        )

    def _stop_command(self, proc: subprocess.Popen, sig: int) -> None:
        """Signal a timed-out ``run`` command: its process group."""
        _signal_group(proc, sig)

    def _limits_argv(self) -> list[str]:
        processes = self.limits.processes
        if not self.switches_uid:
            # RLIMIT_NPROC counts every process of our uid: the sandbox gets its share on top
            processes += _tasks_of_uid(self.uid)
        memory = self.limits.memory_mb * 1024 * 1024
        return [
            _tool("prlimit"),
            f"--nproc={processes}:{processes}",
            f"--data={memory}:{memory}",
            "--core=0",
            "--",
        ]

    def _inner_argv(self, argv: list[str], cwd: PurePosixPath) -> list[str]:
        """The part of the command line that runs as the sandbox's uid: limits, then the
        working folder (entered as the uid: a symlink there cannot take it where it may not go)."""
        inner = self._limits_argv()
        if cwd.parts:
            inner += [_tool("env"), f"--chdir={self.workspace_inside}/{cwd}", "--"]
        return inner + argv

    def _run(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: str | bytes | IO | None,
    ) -> CommandResult:
        self._check_open()
        self._hand_over_once()
        argv = ["bash", "-c", command] if isinstance(command, str) else list(command)
        if not argv:
            raise SandboxError("empty command")
        limit = self.limits.command_s if timeout_s is None else timeout_s
        started = time.monotonic()
        deadline = min(started + limit, self._deadline)
        host_argv, host_cwd = self._wrap(argv, _relative(cwd or "."))
        data = stdin.encode() if isinstance(stdin, str) else stdin
        if data is None:
            stdin_arg: int | IO = subprocess.DEVNULL
        elif isinstance(data, bytes):
            stdin_arg = subprocess.PIPE
        else:
            stdin_arg = data
        with self._lock:
            self._check_open()
            proc = subprocess.Popen(
                host_argv,
                cwd=host_cwd,
                env=self.env(env),
                stdin=stdin_arg,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                umask=0o022,
            )
            self._processes.append(proc)
        try:
            stdout, stderr, killed = self._communicate(proc, data if isinstance(data, bytes) else None, deadline)
        finally:
            if not _exited(proc):  # _communicate failed: do not leave the command running
                _signal_group(proc, signal.SIGKILL)
            proc.wait()
            with self._lock:
                if proc in self._processes:
                    self._processes.remove(proc)
        # killed by the wall-limit watchdog (or a kill_all from another thread) before its own deadline
        killed = killed or (proc.returncode < 0 and (self._expired or self._closed))
        return CommandResult(
            exit_code=None if killed else _exit_code(proc.returncode),
            stdout=stdout,
            stderr=stderr,
            timed_out=killed,
            seconds=time.monotonic() - started,
        )

    def _communicate(self, proc: subprocess.Popen, data: bytes | None, deadline: float) -> tuple[str, str, bool]:
        """Feed stdin, capture both streams up to the limit, and kill the process group at the
        deadline. -> (stdout, stderr, killed by the deadline)."""
        # _run opens both output streams as pipes, and stdin as one whenever there is data to feed
        assert proc.stdout is not None and proc.stderr is not None
        # keyed by the selector's fileobj, which is what select() hands back
        captures: dict[FileDescriptorLike, _Capture] = {proc.stdout: _Capture(self.limits.output_bytes),
                                                        proc.stderr: _Capture(self.limits.output_bytes)}
        selector = selectors.DefaultSelector()
        for output in captures:
            selector.register(output, selectors.EVENT_READ)
        if data is not None:
            assert proc.stdin is not None
            if data:
                # non-blocking: a command that writes before it reads must not stall us mid-write
                os.set_blocking(proc.stdin.fileno(), False)
                selector.register(proc.stdin, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        try:
            pidfd = os.pidfd_open(proc.pid)  # readable when the process exits: no polling
            selector.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = None
        offset, exited_at, term_at, killed = 0, None, None, False
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and _exited(proc):
                    exited_at = now
                    if killed:
                        # what is left of a timed-out command's group goes too, while the leader
                        # is an unreaped zombie and the group id cannot belong to anyone else
                        _signal_group(proc, signal.SIGKILL)
                readers = [key for key in selector.get_map().values() if key.fileobj in captures]
                if exited_at is not None:
                    if not readers or now - exited_at >= DRAIN_AFTER_EXIT_S:
                        break
                    wait = exited_at + DRAIN_AFTER_EXIT_S - now
                elif term_at is None:
                    if now >= deadline:
                        killed, term_at = True, now
                        self._stop_command(proc, signal.SIGTERM)
                        continue
                    wait = deadline - now
                else:
                    kill_at = term_at + self.limits.kill_grace_s
                    if now >= kill_at:
                        self._stop_command(proc, signal.SIGKILL)
                        wait = 0.05
                    else:
                        wait = kill_at - now
                if pidfd is None:
                    wait = min(wait, 0.05)
                for key, _ in selector.select(max(wait, 0.0)):
                    if key.fileobj == pidfd:
                        selector.unregister(pidfd)
                    elif key.fileobj is proc.stdin:
                        assert data is not None  # stdin is registered only when there is data to feed
                        try:
                            offset += os.write(proc.stdin.fileno(), data[offset : offset + 65536])
                        except BlockingIOError:
                            pass
                        except BrokenPipeError:  # it stopped reading: the rest is not wanted
                            offset = len(data)
                        if offset >= len(data):
                            selector.unregister(proc.stdin)
                            proc.stdin.close()
                    else:
                        chunk = os.read(key.fd, 65536)
                        if chunk:
                            captures[key.fileobj].add(chunk)
                        else:
                            selector.unregister(key.fileobj)
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
        return captures[proc.stdout].text(), captures[proc.stderr].text(), killed


class LocalSandbox(Sandbox):
    """Commands run on the host filesystem, as the sandbox's uid when arborl is root (see the
    module docstring for what this does not isolate)."""

    kind = "local"

    @property
    def workspace_inside(self) -> str:
        return str(self.workspace)

    @property
    def home_inside(self) -> str:
        return str(self.home)

    @property
    def tmp_inside(self) -> str:
        return str(self.tmp)

    def _prepare(self) -> None:  # noqa: B027 (an optional hook)
        if not self.switches_uid:
            return
        for folder in [self.dir.parent, *self.dir.parent.parents]:
            mode = os.stat(folder).st_mode
            if not mode & stat.S_IXOTH:
                raise SandboxError(
                    f"{folder} (mode {stat.filemode(mode)}) is not searchable by other users: the local "
                    f"sandbox runs commands as uid {self.uid}, which must reach {self.workspace}; make it "
                    "o+x, choose another root, or use the bwrap sandbox"
                )

    def _wrap(self, argv: list[str], cwd: PurePosixPath) -> tuple[list[str], Path]:
        prefix = _setpriv_argv(self.uid, self.gid) + ["--"] if self.switches_uid else []
        # The process starts in the workspace itself (a folder the uid cannot replace);
        # a sub-folder is entered by ``env --chdir`` after the uid switch.
        return prefix + self._inner_argv(argv, cwd), self.workspace


class BwrapSandbox(Sandbox):
    """Every command runs under bubblewrap: read-only system, writable workspace and home only."""

    kind = "bwrap"
    # Read-only system folders (the /bin and /lib ones are links into /usr on merged-/usr systems,
    # and are recreated as links).
    SYSTEM_FOLDERS: ClassVar[tuple[str, ...]] = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        limits: Limits = Limits(),
        source: Path | None = None,
        keep: bool = False,
        expose: Sequence[Path] = (),
        workspace_at: str | None = None,
    ):
        # host paths made visible read-only at the same path (a toolchain under /opt, a venv)
        self.expose = tuple(Path(path).absolute() for path in expose)
        self._workspace_at = _checked_workspace_at(workspace_at or BWRAP_WORKSPACE, self.expose)
        super().__init__(root, name=name, limits=limits, source=source, keep=keep)

    @property
    def workspace_inside(self) -> str:
        return self._workspace_at

    @property
    def home_inside(self) -> str:
        return BWRAP_HOME

    @property
    def tmp_inside(self) -> str:
        return "/tmp"

    def _check_available(self) -> None:  # noqa: B027 (an optional hook: a no-op unless overridden)
        problem = _bwrap_problem()
        if problem is not None:
            raise SandboxUnavailable(problem)

    def _expose_args(self) -> list[str]:
        """Read-only binds of ``expose``, after /tmp's tmpfs (which would hide a path under /tmp).
        The folders bwrap creates on the way are root's 0700 unless told: make them 0755 so the
        sandbox's uid can cross them (an existing folder is left as it is)."""
        args: list[str] = []
        for path in self.expose:
            for parent in reversed(path.parents[:-1]):
                args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", str(path), str(path)]
        return args

    def _stop_command(self, proc: subprocess.Popen, sig: int) -> None:
        """SIGKILL the command's pid-namespace init (bwrap's child), whatever ``sig``: an init
        ignores SIGTERM from outside its namespace, and its death kills everything inside at
        once. Signalling the outer bwrap instead would let it exit while the namespace is still
        being torn down, and ``run`` would return with the command's processes still dying."""
        pidfd = _child_pidfd(proc.pid) if proc.returncode is None else None
        if pidfd is None:
            _signal_group(proc, signal.SIGKILL)
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _wrap(self, argv: list[str], cwd: PurePosixPath) -> tuple[list[str], Path]:
        outer = [_tool("bwrap"), *_system_binds()]
        outer += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", *_tmpfs_size_args(self.limits.memory_mb), "--tmpfs", "/tmp",
            "--perms", "0755", "--dir", "/home",
            "--bind", str(self.home), BWRAP_HOME,
            "--bind", str(self.workspace), self._workspace_at,
            *self._expose_args(),
            "--chdir", self._workspace_at,
            # pid: killing the namespace's init kills all in it; no "--unshare-net": the agent
            # must reach the gateway on 127.0.0.1, which a new network namespace would hide
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox",
            "--die-with-parent",  # the gateway dies -> its sandboxes die
            "--new-session",  # no TIOCSTI into a terminal the gateway may have
            "--",
        ]  # fmt: skip
        # As root, bwrap sets up privileged and setpriv drops to the uid inside; bwrap keeps
        # its own root-owned init outside the uid's reach.
        prefix = _setpriv_argv(self.uid, self.gid) + ["--"] if self.switches_uid else []
        return outer + prefix + self._inner_argv(argv, cwd), self.dir


def _checked_workspace_at(path: str, expose: Sequence[Path]) -> str:
    """Where a bwrap workspace appears: an absolute, normalised folder that hides nothing the
    sandbox needs (not the system, /proc, /dev, /tmp, /home, an exposed path, or above one)."""
    pure = PurePosixPath(path)
    reserved = [PurePosixPath(folder) for folder in _RESERVED_INSIDE] + [PurePosixPath(p) for p in expose]
    if (not pure.is_absolute() or ".." in pure.parts or str(pure) != path or len(pure.parts) < 2
            or any(pure == folder or folder in pure.parents or pure in folder.parents for folder in reserved)):
        raise SandboxError(f"a bwrap workspace cannot be placed at {path!r}: it must be an absolute folder outside "
                           f"{', '.join(_RESERVED_INSIDE)} and the exposed paths")
    return path


def _child_pidfd(parent: int) -> int | None:
    """A pidfd of the (only) child of ``parent``, found in /proc; None if there is none."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            pidfd = os.pidfd_open(int(name))
        except (OSError, IndexError, ValueError):
            continue
        # Checked again through the open pidfd's pid: had the child exited and its pid been
        # reused between the scan and pidfd_open, the new process would not be ``parent``'s.
        try:
            if int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                return pidfd
        except (OSError, IndexError, ValueError):
            pass
        os.close(pidfd)
    return None


def _system_binds() -> list[str]:
    args: list[str] = []
    for folder in BwrapSandbox.SYSTEM_FOLDERS:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    return args


@functools.cache
def _bwrap_help() -> str:
    try:
        return subprocess.run([_tool("bwrap"), "--help"], capture_output=True, text=True, check=False).stdout
    except (OSError, SandboxUnavailable):
        return ""


def _tmpfs_size_args(memory_mb: int) -> list[str]:
    # --size arrived in bubblewrap 0.7; an older one gets a /tmp without a cap
    return ["--size", str(memory_mb * 1024 * 1024)] if "--size" in _bwrap_help() else []


@functools.cache
def _bwrap_problem() -> str | None:
    """None if bubblewrap can make a sandbox here; else why not (checked once per process)."""
    bwrap = shutil.which("bwrap", path=SYSTEM_PATH)
    if bwrap is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if "--perms" not in _bwrap_help():
        return "bubblewrap is too old: 0.5 or later is needed (--perms)"
    argv = [bwrap, *_system_binds(), "--proc", "/proc", "--dev", "/dev", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--die-with-parent", "--new-session", "--", "true"]  # fmt: skip
    try:
        probe = subprocess.run(argv, env={"PATH": SYSTEM_PATH}, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not start: {exc}"
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def bwrap_unavailable_reason() -> str | None:
    """None when the ``bwrap`` sandbox works on this machine, else why it does not."""
    return _bwrap_problem()


def make_sandbox(
    kind: SandboxKind,
    root: Path,
    *,
    name: str,
    limits: Limits = Limits(),
    source: Path | None = None,
    keep: bool = False,
    expose: Sequence[Path] = (),
    workspace_at: str | None = None,
) -> Sandbox:
    """A fresh sandbox of ``kind`` under ``root``, its workspace seeded with a copy of ``source``.
    ``expose``: host paths a ``bwrap`` sandbox sees read-only (a ``local`` one sees them anyway).
    ``workspace_at``: where a ``bwrap`` sandbox's commands find the workspace (default
    /workspace), the folder a task takes as its working directory (Harbor's /app). A ``local``
    one cannot move it: its ``workspace_inside`` is the host folder, and a task's text that names
    ``workspace_at`` must be rewritten to that (``Task.instruction_in``)."""
    if kind == "local":
        return LocalSandbox(root, name=name, limits=limits, source=source, keep=keep)
    if kind == "bwrap":
        return BwrapSandbox(root, name=name, limits=limits, source=source, keep=keep, expose=expose,
                            workspace_at=workspace_at)
    raise SandboxError(f"unknown sandbox kind {kind!r}; known: local, bwrap")


__all__ = [
    "BwrapSandbox",
    "CommandResult",
    "Limits",
    "LocalSandbox",
    "Sandbox",
    "SandboxClosed",
    "SandboxError",
    "SandboxExpired",
    "SandboxKind",
    "SandboxUnavailable",
    "bwrap_unavailable_reason",
    "make_sandbox",
]
