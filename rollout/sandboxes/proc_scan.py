"""Finding and signalling a sandbox's processes through /proc.

A process sandbox knows its processes two ways: the uid it leased (a process cannot shed it)
and the ``ARBORL_SANDBOX_ID`` mark in every process's environment (which a process can shed by
re-executing with a clean environment, so it is the fallback when arborl is not root). A pid
found by a scan may have exited and gone to a stranger by the time it is signalled:
``signal_verified`` checks again through a pidfd before it sends anything.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path


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


def sandbox_pids(uid: int | None, marker: bytes | None) -> list[int]:
    """Live (non-zombie) processes that run as ``uid`` or carry the marker in their environment."""
    return sandbox_pids_among((int(name) for name in os.listdir("/proc") if name.isdigit()), uid, marker)


def sandbox_pids_among(pids: Iterable[int], uid: int | None, marker: bytes | None) -> list[int]:
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


def signal_verified(pid: int, sig: int, uid: int | None, marker: bytes | None) -> None:
    """Signal a process a /proc scan found, through a pidfd opened and then checked again: had
    it exited and its pid gone to another process since the scan, the check fails and nothing is
    sent (root must not kill a stranger)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if sandbox_pids_among([pid], uid, marker):
            signal.pidfd_send_signal(pidfd, sig)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def tasks_of_uid(uid: int) -> int:
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
