"""Real ``arborl serve`` processes for the tests that need several (a gateway per OS process,
sharing nothing but their store): start, wait until ready, stop, and read their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def gateway_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBORL_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def serve_gateway(model_dir: Path, run_dir: Path, dsn: str, port: int) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    log = open(run_dir / "gateway.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "arborl.ops.cli", "serve", "--model", str(model_dir), "--served-name", "tiny",
         "--device", "cpu", "--port", str(port), "--run-dir", str(run_dir), "--store", dsn],
        stdout=log, stderr=subprocess.STDOUT, env=gateway_env(), start_new_session=True,
    )


def gateway_log(run_dir: Path) -> str:
    path = run_dir / "gateway.log"
    return path.read_text()[-3000:] if path.is_file() else ""


def wait_until_ready(processes: list[subprocess.Popen], urls: list[str], run_dirs: list[Path]) -> None:
    deadline = time.monotonic() + 120
    waiting = set(range(len(urls)))
    while waiting:
        for i in sorted(waiting):
            assert processes[i].poll() is None, f"gateway {i} exited during start-up:\n{gateway_log(run_dirs[i])}"
            try:
                if httpx.get(urls[i] + "/readyz", timeout=1).status_code == 200:
                    waiting.discard(i)
            except httpx.TransportError:
                pass
        assert time.monotonic() < deadline, f"gateways {sorted(waiting)} not ready:\n" + "\n".join(
            gateway_log(run_dirs[i]) for i in waiting)
        time.sleep(0.2)


def stop_gateway(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=15)
