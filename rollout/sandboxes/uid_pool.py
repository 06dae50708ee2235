"""The uid pool: one unprivileged uid per sandbox, when arborl runs as root.

RLIMIT_NPROC is not enforced for root and counts processes per uid, so a sandbox's process
limit is exact only when the sandbox has a uid of its own; and a process cannot shed its uid, so
"every process of the uid" is a complete list of the sandbox's processes. Each sandbox leases a
uid from ``UID_POOL_BASE ... + UID_POOL_SIZE`` (a range systemd documents as unused) by holding
an flock on the uid's lock file in a root-only folder: concurrent sandboxes, in this process or
another, get different uids, and a lease ends with its holder even if it dies.
"""

from __future__ import annotations

import fcntl
import functools
import os
import secrets
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

from .base import SYSTEM_PATH, SandboxError, SandboxUnavailable, system_tool
from .proc_scan import sandbox_pids, signal_verified

# Between the nspawn container range (which ends at 1879048191) and 2^31: no login user,
# container or DynamicUser has these.
UID_POOL_BASE = 1_900_000_000
UID_POOL_SIZE = 4096


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


class UidLease:
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
            for pid in sandbox_pids(uid, None):
                signal_verified(pid, signal.SIGKILL, uid, None)
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
def uid_switch_problem() -> str | None:
    """None if this (root) process can run a command as a pool uid; else why not."""
    if not _uid_map_covers(UID_POOL_BASE, UID_POOL_SIZE):
        return f"uids {UID_POOL_BASE}..{UID_POOL_BASE + UID_POOL_SIZE - 1} are not mapped in this user namespace"
    uid = UID_POOL_BASE + UID_POOL_SIZE - 1
    try:
        probe = subprocess.run(
            [*setpriv_argv(uid, uid), "--", "true"],
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


def setpriv_argv(uid: int, gid: int) -> list[str]:
    return [
        system_tool("setpriv"),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        # no setuid binary (su, mount, ...) can give anything back
        "--no-new-privs",
        "--bounding-set=-all",
        "--inh-caps=-all",
    ]
