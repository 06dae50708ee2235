"""Engine servers arborl starts itself: vLLM or SGLang servers as children of the gateway.

With ``engine.kind: vllm`` (or ``sglang``) and ``engine.launch: true``, ``arborl serve`` (and
``arborl up``) start ``engine.replicas`` servers from ``engine.python`` (the engine's own venv):
replica ``i`` listens on 127.0.0.1 at ``engine.url``'s port + ``i``, sees the GPUs
``engine.devices[i]`` (when given) and writes its output to ``RUN/<kind>-<i>.log`` (``RUN/vllm.log``
for a single vLLM server). They start together; arborl waits until each answers and stops them
all when the gateway stops: SIGTERM to each process group, SIGKILL after 30 s.

Each server gets what its engine needs of it. vLLM: the RL routes (``VLLM_SERVER_DEV_MODE=1``),
the logprobs of the sampling distribution (``--logprobs-mode processed_logprobs``) and the
prefix cache's figures per request (``--enable-prompt-tokens-details``). SGLang: nothing beyond
its defaults (``/generate`` and the weight routes are always there).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

DEFAULT_VLLM_PYTHON = "/opt/vllm-venv/bin/python"
DEFAULT_SGLANG_PYTHON = "/opt/sglang-venv/bin/python"


class EngineServer:
    """One engine server process: ``command`` run with ``env``, answering ``ready_path`` at ``url``."""

    name = "engine"

    def __init__(self, python: str, command: list[str], env: dict[str, str], port: int, log: Path,
                 ready_path: str):
        if not Path(python).is_file():
            raise FileNotFoundError(f"no python at {python} for the {self.name} server (engine.python): install "
                                    f"{self.name} into a venv of its own (see the README)")
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = log
        self._command = [python, *command]
        self._env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
        self._ready_path = ready_path
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout_s: float = 900.0) -> None:
        """Start the server and wait until it answers (it compiles its model first: minutes on a CPU)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self._process = subprocess.Popen(self._command, env=self._env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the {self.name} server exited with {self._process.returncode}; its log, "
                                   f"{self.log}, ends:\n{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the {self.name} server did not answer within {timeout_s:.0f} s; see {self.log}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@dataclass(frozen=True)
class ServerCommand:
    """How one engine server is started: the arguments after its python, the environment it
    needs, and the path that answers 200 once it is ready. Pure, so the Kubernetes manifests
    (ops/kubernetes.py) start a pod's server exactly as ``arborl serve --launch`` starts a child."""

    args: list[str]
    env: dict[str, str]
    ready_path: str


def vllm_command(model_dir: Path, port: int, *, host: str = "127.0.0.1", max_num_seqs: int = 16,
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_fraction: float | None = None,
                 devices: str | None = None, extra_args: Sequence[str] = (),
                 cpu_kv_cache_gib: int = 1) -> ServerCommand:
    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", model_dir.name, "--dtype", dtype, "--max-num-seqs", str(max_num_seqs),
            "--host", host, "--port", str(port),
            "--logprobs-mode", "processed_logprobs", "--enable-prompt-tokens-details",
            *(("--max-model-len", str(max_model_len)) if max_model_len else ()),
            *(("--gpu-memory-utilization", str(gpu_memory_fraction)) if gpu_memory_fraction else ()),
            *extra_args]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(cpu_kv_cache_gib),
           **({"CUDA_VISIBLE_DEVICES": devices} if devices else {})}
    return ServerCommand(args, env, "/v1/models")


def sglang_command(model_dir: Path, port: int, *, host: str = "127.0.0.1", max_num_seqs: int = 16,
                   dtype: str = "auto", max_model_len: int | None = None, gpu_memory_fraction: float | None = None,
                   devices: str | None = None, extra_args: Sequence[str] = ()) -> ServerCommand:
    args = ["-m", "sglang.launch_server", "--model-path", str(model_dir),
            "--served-model-name", model_dir.name, "--dtype", dtype,
            "--max-running-requests", str(max_num_seqs), "--host", host, "--port", str(port),
            *(("--context-length", str(max_model_len)) if max_model_len else ()),
            *(("--mem-fraction-static", str(gpu_memory_fraction)) if gpu_memory_fraction else ()),
            *extra_args]
    return ServerCommand(args, {"CUDA_VISIBLE_DEVICES": devices} if devices else {}, "/health")


class VllmServer(EngineServer):
    """A vLLM server (``vllm.entrypoints.openai.api_server``) serving ``model_dir``."""

    name = "vLLM"

    def __init__(self, python: str, model_dir: Path, port: int, log: Path, *, max_num_seqs: int = 16,
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_fraction: float | None = None,
                 devices: str | None = None, extra_args: Sequence[str] = (), cpu_kv_cache_gib: int = 1):
        command = vllm_command(model_dir, port, max_num_seqs=max_num_seqs, dtype=dtype, max_model_len=max_model_len,
                               gpu_memory_fraction=gpu_memory_fraction, devices=devices, extra_args=extra_args,
                               cpu_kv_cache_gib=cpu_kv_cache_gib)
        super().__init__(python, command.args, command.env, port, log, command.ready_path)


class SglangServer(EngineServer):
    """An SGLang server (``sglang.launch_server``) serving ``model_dir``."""

    name = "SGLang"

    def __init__(self, python: str, model_dir: Path, port: int, log: Path, *, max_num_seqs: int = 16,
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_fraction: float | None = None,
                 devices: str | None = None, extra_args: Sequence[str] = ()):
        command = sglang_command(model_dir, port, max_num_seqs=max_num_seqs, dtype=dtype, max_model_len=max_model_len,
                                 gpu_memory_fraction=gpu_memory_fraction, devices=devices, extra_args=extra_args)
        super().__init__(python, command.args, command.env, port, log, command.ready_path)


SERVERS: dict[str, type[VllmServer] | type[SglangServer]] = {"vllm": VllmServer, "sglang": SglangServer}


def start_together(servers: Sequence[EngineServer]) -> None:
    """Start ``servers`` at once (each compiles its model: minutes on a CPU) and wait for all of
    them; if one fails, stop them all and raise its error."""
    failures: list[BaseException] = []

    def start(server: EngineServer) -> None:
        try:
            server.start()
        except (RuntimeError, OSError) as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(server,), daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        for server in servers:
            server.stop()
        raise RuntimeError(str(failures[0]))


def loopback_port(url: str) -> int:
    """The port of ``url``, which a server arborl starts must be on (http://127.0.0.1:PORT)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise ValueError(f"engine.url {url!r}: a server arborl starts listens on http://127.0.0.1:PORT")
    return parts.port


def launch_servers(settings: Any, model_dir: Path, run_dir: Path) -> list[EngineServer]:
    """Start ``settings.replicas`` servers of ``settings.kind`` together and wait for all of them
    (``settings`` is an ``engine`` section of kind vllm or sglang). One that fails stops the others."""
    port = loopback_port(settings.urls[0])
    count = settings.replicas
    servers: list[EngineServer] = []
    for i in range(count):
        log = run_dir / (f"{settings.kind}.log" if count == 1 else f"{settings.kind}-{i}.log")
        devices = settings.devices[i] if i < len(settings.devices) else None
        servers.append(SERVERS[settings.kind](
            settings.python, model_dir, port + i, log, max_num_seqs=settings.max_running, dtype=settings.dtype,
            max_model_len=settings.max_model_len, gpu_memory_fraction=settings.gpu_memory_fraction,
            devices=devices, extra_args=tuple(settings.extra_args)))
    start_together(servers)
    return servers
