"""``bwrap``: a process sandbox whose every command runs under bubblewrap.

Each command sees a read-only view of the system (/usr, /etc, the /bin and /lib links) plus
``expose`` paths, the workspace at ``/workspace`` (or at ``workspace_at``, the folder a task takes
as its working directory: Harbor's ``/app``) and the home at ``/home/agent`` (writable), a private
tmpfs ``/tmp`` (at most ``memory_mb``), a fresh ``/proc`` and ``/dev``, and new pid, ipc, uts and
cgroup namespaces. It sees no other workspace, no run folder and nothing of the caller's root
but its own two folders. The network namespace is shared on purpose: the agent must reach the
gateway on 127.0.0.1 (so it can also reach anything else listening there; keep the admin API
behind its token). Each command is its own pid namespace: when the command ends, everything it
started in the background ends with it (``start`` a long-lived process instead), and a timeout
kills the namespace at once (its init ignores SIGTERM from outside, so there is no grace
period). As root, bwrap itself runs privileged (no user namespace needed) and ``setpriv`` inside
drops to the sandbox's uid; otherwise bwrap runs unprivileged, which needs user namespaces.
``--die-with-parent`` ties each command to the thread that started it: start long-lived
processes from a thread that outlives them. Everything else (uids, limits, cleanup) is the
process sandbox's (process.py).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import ClassVar

from .base import DEFAULT_LIMITS, SYSTEM_PATH, Limits, SandboxError, SandboxUnavailable, system_tool
from .process import ProcessSandbox, signal_group
from .uid_pool import setpriv_argv

BWRAP_WORKSPACE = "/workspace"
BWRAP_HOME = "/home/agent"
# Where a bwrap workspace may not go: the system it sees, and the mounts it makes itself.
_RESERVED_INSIDE = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/dev", "/tmp",
                    "/home")


class BwrapSandbox(ProcessSandbox):
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
        limits: Limits = DEFAULT_LIMITS,
        source: Path | None = None,
        keep: bool = False,
        expose: Sequence[Path] = (),
        workspace_at: str | None = None,
        move_source: bool = False,
    ):
        # host paths made visible read-only at the same path (a toolchain under /opt, a venv)
        self.expose = tuple(Path(path).absolute() for path in expose)
        self._workspace_at = _checked_workspace_at(workspace_at or BWRAP_WORKSPACE, self.expose)
        super().__init__(root, name=name, limits=limits, source=source, keep=keep, move_source=move_source)

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
            signal_group(proc, signal.SIGKILL)
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _wrap(self, argv: list[str], cwd: PurePosixPath) -> tuple[list[str], Path]:
        outer = [system_tool("bwrap"), *_system_binds()]
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
        prefix = setpriv_argv(self.uid, self.gid) + ["--"] if self.switches_uid else []
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
        return subprocess.run([system_tool("bwrap"), "--help"], capture_output=True, text=True, check=False).stdout
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
