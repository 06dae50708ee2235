"""A real two-node Ray cluster on this machine, for the Ray placement test and bench: a head
(127.0.0.2, custom resource ``node1``) and a second node (127.0.0.3, ``node2``), one CPU each.

Ray rewrites 127.0.0.1 to the host's own address, so the nodes use 127.0.0.2 and .3, and every
port is given. A cluster that does not come up (Ray under a heavy load) is tried once more; then
``two_node_cluster`` yields None and its log says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _start_node(args: list[str], temp_dir: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", temp_dir, *args],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=RAY_ENV, start_new_session=True)


def raylet_of(ip: str, temp_dir: str) -> int | None:
    """The pid of the raylet of the node at ``ip`` in the cluster whose files are in ``temp_dir``
    (another cluster on this machine may use the same address)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (argv and argv[0].endswith(b"/raylet") and f"--node_ip_address={ip}".encode() in argv
                and f"--temp_dir={temp_dir}".encode() in argv):
            return int(name)
    return None


def _alive_nodes(address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, _node_ip_address={HEAD_IP!r}, logging_level='ERROR', "
            "log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=RAY_ENV)
    return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's, 127.0.0.2:PORT
    temp_dir: str  # its session files

    def raylet(self, ip: str) -> int | None:
        return raylet_of(ip, self.temp_dir)


@contextlib.contextmanager
def two_node_cluster(log: Path) -> Iterator[RayCluster | None]:
    """The cluster while it runs, or None if it did not come up; everything of it is killed on
    exit."""
    # a short temp dir: Ray's unix sockets live there and their paths have a length limit
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    nodes: list[subprocess.Popen] = []
    cluster: RayCluster | None = None
    try:
        for _attempt in range(2):
            port = free_port()
            ports = [free_port() for _ in range(8)]
            nodes.append(_start_node(
                ["--head", "--port", str(port), "--node-ip-address", HEAD_IP, "--num-cpus", "1",
                 "--resources", '{"node1": 1}', "--include-dashboard", "false",
                 "--dashboard-port", str(ports[0]), "--dashboard-agent-listen-port", str(ports[1]),
                 "--dashboard-agent-grpc-port", str(ports[2]), "--metrics-export-port", str(ports[3]),
                 "--ray-client-server-port", str(ports[4]), "--min-worker-port", "23000",
                 "--max-worker-port", "23499"], temp_dir, log))
            time.sleep(5)
            nodes.append(_start_node(
                ["--address", f"{HEAD_IP}:{port}", "--node-ip-address", SECOND_IP, "--num-cpus", "1",
                 "--resources", '{"node2": 1}', "--dashboard-agent-listen-port", str(ports[5]),
                 "--dashboard-agent-grpc-port", str(ports[6]), "--metrics-export-port", str(ports[7]),
                 "--min-worker-port", "23500", "--max-worker-port", "23999"], temp_dir, log))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _alive_nodes(f"{HEAD_IP}:{port}") < 2:
                time.sleep(2)
            if _alive_nodes(f"{HEAD_IP}:{port}") == 2:
                cluster = RayCluster(f"{HEAD_IP}:{port}", temp_dir)
                break
            for node in nodes:
                os.killpg(node.pid, signal.SIGKILL)
            nodes.clear()
        yield cluster
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", temp_dir], check=False)  # the session's workers
        shutil.rmtree(temp_dir, ignore_errors=True)
