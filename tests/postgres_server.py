"""A throwaway PostgreSQL server for the tests: a real server (Debian's postgresql), on loopback.

``initdb`` refuses to run as root, so as root the server's folder belongs to the ``postgres``
user and its commands run as that user; otherwise as the current user. It listens on 127.0.0.1
only, on a free port, with its socket in its own folder, and trusts local connections (a test
server, never a production one).

    eval "$(python tests/postgres_server.py start /tmp/arborl-pg)"   # exports ARBORL_TEST_POSTGRES_DSN
    python tests/postgres_server.py stop /tmp/arborl-pg
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

DSN_VARIABLE = "ARBORL_TEST_POSTGRES_DSN"


def binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(folder: Path) -> str:
    """Start a server with its data in ``folder`` (made fresh); its DSN."""
    initdb, pg_ctl = binary("initdb"), binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql; ops/bootstrap.sh does)")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if os.geteuid() == 0:
        folder.chmod(0o755)
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    subprocess.run(_as_owner([initdb, "-D", str(data), "--auth=trust", "-U", "arborl", "-E", "UTF8"]),
                   check=True, capture_output=True)
    port = _free_port()
    (folder / "options").write_text(f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=on")
    restart(folder)
    return f"postgresql://arborl@127.0.0.1:{port}/postgres"


def restart(folder: Path) -> None:
    """Start the server of ``folder`` again (after ``crash``), on its port, with its data."""
    options = (folder / "options").read_text()
    subprocess.run(_as_owner([binary("pg_ctl") or "pg_ctl", "-D", str(folder / "data"), "-o", options,
                              "-l", str(folder / "server.log"), "-w", "start"]), check=True, capture_output=True)


def crash(folder: Path) -> None:
    """Stop the server at once, as a crash would (``-m immediate``: no shutdown checkpoint, every
    connection cut); its data stays, and ``restart`` brings it back."""
    subprocess.run(_as_owner([binary("pg_ctl") or "pg_ctl", "-D", str(folder / "data"), "-m", "immediate", "-w",
                              "stop"]), check=True, capture_output=True)


def stop(folder: Path) -> None:
    pg_ctl = binary("pg_ctl")
    if pg_ctl and (folder / "data").is_dir():
        subprocess.run(_as_owner([pg_ctl, "-D", str(folder / "data"), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    command, where = sys.argv[1], Path(sys.argv[2])
    if command == "start":
        print(f"export {DSN_VARIABLE}={start(where)}")
    else:
        stop(where)
