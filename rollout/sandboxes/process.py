"""Process sandboxes: a sandbox's commands are processes on this machine (``local``; ``bwrap``
in bwrap.py builds on it).

A process sandbox owns a scratch folder ``<root>/<name>-<random>/`` holding ``workspace/``,
``home/`` and ``tmp/``. ``run`` runs a shell string through ``bash -c`` (or an argv), ``start``
(or ``popen``) a long-running scaffold process; ``close`` kills everything the sandbox started
and removes the scratch folder.

Invariants, for both kinds:

- **Nothing is inherited.** Every process gets a fresh environment (PATH, HOME, TMPDIR, LANG,
  ... plus what the caller passes): the gateway's admin token, API keys and the store's location
  never leak in. File descriptors are not inherited either (``close_fds``).
- **Every process is the sandbox's, and close() leaves none behind.** When arborl runs as root
  (the normal case in CI and on rollout hosts), each sandbox leases its own unprivileged uid
  (uid_pool.py) and every command drops to it (``setpriv --reuid --regid --clear-groups
  --no-new-privs``). A process cannot shed its uid, so ``close`` kills with ``kill(-1, SIGKILL)``
  sent *as that uid* -- the kernel walks the process list under its lock, so even a fork bomb
  cannot outrun it -- and then checks ``/proc`` until no process runs as the uid. Every process
  also carries ``ARBORL_SANDBOX_ID=<id>`` in its environment; the ``/proc`` scan kills what
  carries it (the root-owned bwrap helpers, and the sandbox's processes when arborl is not
  root). Each command has its own session and process group, and a timeout kills the group
  (SIGTERM, then SIGKILL after ``Limits.kill_grace_s``); under ``local`` the background jobs and
  daemons of a command that exits by itself live on, as in a terminal, until ``close``.
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
  life: at the deadline a watchdog kills every process (started scaffolds included) and later
  calls raise ``SandboxExpired``.

Beyond the protocol, a process sandbox has host paths (``workspace``, ``home``, ``dir``) for
callers that live on the same machine and know it (its own tests, the sandbox bench); the
rollout code does not use them. Files the host writes there after creation belong to root;
``hand_over()`` gives them to the sandbox's uid, and ``run``/``popen`` call it before the first
command. ``copy_in`` writes as the sandbox's uid (it streams a tar into the sandbox).

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
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, ClassVar, Self

from . import archive
from .base import (
    DEFAULT_LIMITS,
    MARKER_VAR,
    SYSTEM_PATH,
    Area,
    CommandResult,
    Limits,
    OutputCapture,
    OutputFile,
    PopenHandle,
    SandboxError,
    SandboxKind,
    SandboxUnavailable,
    WallClock,
    WallClocked,
    command_argv,
    exit_code_of,
    new_sandbox_id,
    relative_path,
    sandbox_environment,
    system_tool,
)
from .proc_scan import sandbox_pids, signal_verified, tasks_of_uid
from .uid_pool import UID_POOL_BASE, UID_POOL_SIZE, UidLease, setpriv_argv, uid_switch_problem

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

# After a command exits, how long to keep reading its output: a background process it left
# holding the pipes must not hold ``run`` until the timeout.
DRAIN_AFTER_EXIT_S = 0.2


def signal_group(proc: subprocess.Popen, sig: int) -> None:
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


def remove_tree(path: Path) -> None:
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



class ProcessSandbox(WallClocked, ABC):
    """A workspace, a private HOME, and processes on this machine that run there under ``limits``
    (the ``Sandbox`` protocol, plus host paths for callers on this machine).

    ``workspace`` and ``home`` are host paths; ``workspace_inside`` and ``home_inside`` are the
    same folders as the sandbox's commands see them (equal for ``local``).
    """

    kind: ClassVar[SandboxKind]

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        limits: Limits = DEFAULT_LIMITS,
        source: Path | None = None,
        keep: bool = False,
        move_source: bool = False,
    ):
        self.limits = limits
        self.keep = keep
        self.id = new_sandbox_id(name)
        self._marker = f"{MARKER_VAR}={self.id}".encode()
        self._lock = threading.Lock()
        self._kill_lock = threading.Lock()  # one kill_all sweep at a time
        self._processes: list[subprocess.Popen] = []
        self._closed = False
        self._handed_over = False
        self._started = 0  # processes ``start`` has made (names their output files)
        self._clock = WallClock(self.id, limits.wall_s)
        self._lease: UidLease | None = None
        if source is not None and not Path(source).is_dir():
            raise SandboxError(f"source {source} is not a folder")
        self._check_available()

        if os.geteuid() == 0:
            problem = uid_switch_problem()
            if problem is not None:
                # As root without a uid to drop to, RLIMIT_NPROC is not enforced: a fork bomb
                # would have the machine. Refuse rather than run unprotected.
                raise SandboxUnavailable(f"running as root but cannot drop to a sandbox uid: {problem}")
            self._lease = UidLease()
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
            for folder in (self.home, self.tmp):
                folder.mkdir(mode=0o700)
            self._seed(Path(source) if source is not None else None, move_source)
            self._prepare()
            for folder in (self.workspace, self.home, self.tmp):
                _chown_tree(folder, self.uid, self.gid)
        except BaseException:
            if created:
                remove_tree(self.dir)
            self._release()
            raise
        # the wall clock starts once the workspace is ready: copying a large source is not the agent's time
        self._clock.start(self.kill_all)

    def _seed(self, source: Path | None, move: bool) -> None:
        """The workspace: empty, a copy of ``source``, or ``source`` itself renamed into place
        (``move``: a staging folder its owner gives up; one rename instead of a copy of every
        file, when it is on the same filesystem)."""
        if source is not None and move:
            try:
                os.rename(source, self.workspace)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            else:
                os.chmod(self.workspace, 0o700)
                return
        self.workspace.mkdir(mode=0o700)
        if source is not None:
            shutil.copytree(source, self.workspace, symlinks=True, dirs_exist_ok=True)
            os.chmod(self.workspace, 0o700)  # copytree gave it the source's mode

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

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The complete environment of a sandboxed process: a minimal base, then ``extra``."""
        return sandbox_environment(self.id, home=self.home_inside, tmp=self.tmp_inside, extra=extra)

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
        host_argv, host_cwd = self._wrap(list(argv), relative_path(cwd or "."))
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

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> PopenHandle:
        """``popen`` with its output (stdout and stderr together) kept in a file of the scratch
        folder, behind the protocol's ``SandboxProcess``."""
        self._check_open()
        with self._lock:
            self._started += 1
            output_path = self.dir / f"process-{self._started}.out"
        # root's, 0600: the scratch folder is searchable by the sandbox's uid
        fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            proc = self.popen(argv, env=env, cwd=cwd, stdout=fd, stderr=subprocess.STDOUT)
        finally:
            os.close(fd)  # the child has its own copy
        # its process group (under ``bwrap``, its pid namespace: all it started)
        return PopenHandle(proc, OutputFile(output_path, self.limits.output_bytes),
                           lambda popen: self._stop_command(popen, signal.SIGKILL))

    def copy_in(self, src: Path, dest: str, *, into: Area = "workspace") -> None:
        """Copy a host file or folder to ``dest`` under the workspace or the home (a folder's
        contents merge into ``dest``). The files are written by the sandbox's own uid, from
        inside it: a symlink the agent left there cannot redirect the write outside."""
        folder = self.workspace_inside if into == "workspace" else self.home_inside
        archive.copy_in(self._run_inside, self.dir, src, dest, folder)

    def copy_out(self, src: str, dest: Path) -> None:
        """Copy a workspace file or folder to the host (see the protocol): packed inside, as the
        sandbox's uid, and unpacked here through tarfile's ``data`` filter."""
        archive.copy_out(self._run_inside, self.dir, src, self.workspace_inside, dest)

    def _run_inside(self, argv: list[str], stdin: IO[bytes] | None, stdout_to: IO[bytes] | None) -> CommandResult:
        """archive.py's way in: ``argv`` as the sandbox's uid, within ``Limits.command_s``."""
        return self._run(argv, timeout_s=None, env=None, cwd=None, stdin=stdin, stdout_to=stdout_to)

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
        return sandbox_pids(self.uid if self.switches_uid else None, self._marker)

    def kill_all(self) -> None:
        """Kill every process of the sandbox: SIGTERM, up to ``kill_grace_s`` for them to exit,
        then SIGKILL until a /proc scan finds none. Raises SandboxError if one survives.

        One sweep at a time (the wall-limit watchdog's and ``close``'s can meet): the helper that
        sends ``kill -1`` runs as the sandbox's uid, so a sweep beside another would find the
        other's helper in every scan and take it for a survivor."""
        with self._kill_lock:
            self._kill_all()

    def _kill_all(self) -> None:
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
        self._clock.stop()
        try:
            self.kill_all()
        finally:
            if self.keep:
                # a later sandbox may lease the same uid: it must not read this one's files
                if self.switches_uid and self.dir.exists():
                    _chown_tree(self.dir, os.geteuid(), os.getegid())
            else:
                remove_tree(self.dir)
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

    def _signal_everything(self, sig: int, tracked: Iterable[subprocess.Popen]) -> None:
        for proc in tracked:
            signal_group(proc, sig)
        if self._lease is not None:
            self._signal_as_uid(sig)
        for pid in self.processes():
            signal_verified(pid, sig, self.uid if self.switches_uid else None, self._marker)

    def _signal_as_uid(self, sig: int) -> None:
        """kill(-1, sig) from a process running as the sandbox's uid: every process of that uid,
        in one pass the kernel makes under the task-list lock (a fork bomb cannot outrun it)."""
        # kill(-1) from root would signal every process on the machine: refuse any uid outside
        # the pool here, and have the shell check its own uids before it sends anything.
        if not UID_POOL_BASE <= self.uid < UID_POOL_BASE + UID_POOL_SIZE:
            raise SandboxError(f"refusing to kill(-1) as uid {self.uid}, which is not a sandbox uid")
        guarded = f'[ "$UID" = {self.uid} ] && [ "$EUID" = {self.uid} ] && kill -s {signal.Signals(sig).name[3:]} -1'
        subprocess.run(
            [system_tool("bash"), "-c", guarded],
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
        signal_group(proc, sig)

    def _limits_argv(self) -> list[str]:
        processes = self.limits.processes
        if not self.switches_uid:
            # RLIMIT_NPROC counts every process of our uid: the sandbox gets its share on top
            processes += tasks_of_uid(self.uid)
        memory = self.limits.memory_mb * 1024 * 1024
        return [
            system_tool("prlimit"),
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
            inner += [system_tool("env"), f"--chdir={self.workspace_inside}/{cwd}", "--"]
        return inner + argv

    def _run(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: str | bytes | IO | None,
        stdout_to: IO[bytes] | None = None,
    ) -> CommandResult:
        """``run``, with stdout written to ``stdout_to`` instead of captured when it is given
        (``copy_out``'s archive: bytes, and not bounded by ``output_bytes``)."""
        self._check_open()
        self._hand_over_once()
        argv = command_argv(command)
        limit = self.limits.command_s if timeout_s is None else timeout_s
        started = time.monotonic()
        deadline = min(started + limit, self._clock.deadline)
        host_argv, host_cwd = self._wrap(argv, relative_path(cwd or "."))
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
                stdout=subprocess.PIPE if stdout_to is None else stdout_to,
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
                signal_group(proc, signal.SIGKILL)
            proc.wait()
            with self._lock:
                if proc in self._processes:
                    self._processes.remove(proc)
        # killed by the wall-limit watchdog (or a kill_all from another thread) before its own deadline
        killed = killed or (proc.returncode < 0 and (self._clock.passed or self._closed))
        return CommandResult(
            exit_code=None if killed else exit_code_of(proc.returncode),
            stdout=stdout,
            stderr=stderr,
            timed_out=killed,
            seconds=time.monotonic() - started,
        )

    def _communicate(self, proc: subprocess.Popen, data: bytes | None, deadline: float) -> tuple[str, str, bool]:
        """Feed stdin, capture both streams up to the limit, and kill the process group at the
        deadline. -> (stdout, stderr, killed by the deadline)."""
        # _run opens stderr (and stdout unless it goes to a file) as pipes, and stdin as one
        # whenever there is data to feed
        assert proc.stderr is not None
        # keyed by the selector's fileobj, which is what select() hands back
        captures: dict[FileDescriptorLike, OutputCapture] = {
            stream: OutputCapture(self.limits.output_bytes) for stream in (proc.stdout, proc.stderr)
            if stream is not None}
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
                        signal_group(proc, signal.SIGKILL)
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
        stdout = captures[proc.stdout].text() if proc.stdout is not None else ""
        return stdout, captures[proc.stderr].text(), killed


class LocalSandbox(ProcessSandbox):
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
        prefix = setpriv_argv(self.uid, self.gid) + ["--"] if self.switches_uid else []
        # The process starts in the workspace itself (a folder the uid cannot replace);
        # a sub-folder is entered by ``env --chdir`` after the uid switch.
        return prefix + self._inner_argv(argv, cwd), self.workspace

