"""Files across a sandbox's boundary as tar streams, so that the sandbox's side does its own I/O.

``copy_in`` packs host files here and a command *inside* the sandbox unpacks them as the
sandbox's uid: a symlink the agent left in the workspace can only redirect a write to where the
agent could write anyway. ``copy_out`` has a command inside pack (as the sandbox's uid: it
reads only what the agent could read) and unpacks here with tarfile's ``data`` filter: absolute
names, ``..``, links that point outside the destination and device files are refused, and no
owner or setuid bit is carried over.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .base import CommandResult, SandboxError, relative_path

# Runs an argv inside the sandbox as its user: (argv, an archive to feed on stdin or None, a
# file for stdout or None) -> the result. Each kind supplies its own.
RunInside = Callable[[list[str], IO[bytes] | None, IO[bytes] | None], CommandResult]

# The one shell line that unpacks an archive on stdin into the folder "$1" (created).
UNPACK_SCRIPT = 'mkdir -p -- "$1" && exec tar -x --no-same-owner --preserve-permissions -f - -C "$1"'
# ... and the one that packs "$1" to stdout: a folder's contents as ".", a file under its own name.
PACK_SCRIPT = ('if [ -d "$1" ]; then cd -- "$1" && exec tar -c -f - .; '
               'elif [ -e "$1" ] || [ -L "$1" ]; then '
               'cd -- "$(dirname -- "$1")" && exec tar -c -f - -- "$(basename -- "$1")"; '
               'else echo "no such file or folder: $1" >&2; exit 2; fi')


def pack(src: Path, archive: IO[bytes], *, arcname: str) -> None:
    """Write ``src`` (a file, or a folder as ``arcname`` = ".") into ``archive`` and rewind it."""
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(src, arcname=arcname)
    archive.seek(0)


def unpack_checked(archive: IO[bytes], dest: Path) -> None:
    """Unpack what ``PACK_SCRIPT`` wrote: a folder's contents into ``dest`` (created), or its one
    file to the path ``dest``. Raises SandboxError for anything the ``data`` filter refuses."""
    dest = Path(dest)
    archive.seek(0)
    try:
        with tarfile.open(fileobj=archive, mode="r") as tar:
            members = tar.getmembers()
            is_folder = any(member.name in (".", "./") for member in members)
            if is_folder:
                dest.mkdir(parents=True, exist_ok=True)
                tar.extractall(dest, filter="data")
                return
            if len(members) != 1:
                raise SandboxError(f"copy_out expected one file, the archive holds {len(members)} entries")
            # a single file: unpacked beside ``dest`` first, then moved into place
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".arborl-copy-out-") as staging:
                tar.extractall(staging, filter="data")
                os.replace(Path(staging) / members[0].name, dest)
    except tarfile.FilterError as exc:
        raise SandboxError(f"copy_out refused an entry: {exc}") from exc
    except tarfile.TarError as exc:
        raise SandboxError(f"copy_out got a broken archive: {exc}") from exc



def copy_in(run_inside: RunInside, scratch: Path, src: Path, dest: str, folder: str) -> None:
    """The protocol's ``copy_in``: ``src`` packed here, unpacked at ``folder/dest`` inside."""
    src = Path(src)
    rel = relative_path(dest)
    if not src.exists():
        raise FileNotFoundError(src)
    if src.is_dir():
        target, arcname = rel, "."
    else:
        if not rel.name:
            raise SandboxError(f"copy_in of the file {src} needs a destination file name, got {dest!r}")
        target, arcname = rel.parent, rel.name
    with tempfile.TemporaryFile(dir=scratch) as archive:
        pack(src, archive, arcname=arcname)
        result = run_inside(["bash", "-c", UNPACK_SCRIPT, "copy_in", f"{folder}/{target}"], archive, None)
    if result.exit_code != 0:
        raise SandboxError(f"copy_in {src} -> {dest} failed ({result.exit_code}): {result.stderr.strip()}")


def copy_out(run_inside: RunInside, scratch: Path, src: str, workspace: str, dest: Path) -> None:
    """The protocol's ``copy_out``: ``workspace/src`` packed inside, unpacked here, checked."""
    rel = relative_path(src)
    with tempfile.TemporaryFile(dir=scratch) as archive:
        result = run_inside(["bash", "-c", PACK_SCRIPT, "copy_out", f"{workspace}/{rel}"], None, archive)
        if result.exit_code != 0:
            raise SandboxError(f"copy_out {src} failed ({result.exit_code}): {result.stderr.strip()}")
        unpack_checked(archive, Path(dest))
