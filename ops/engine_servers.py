"""Engine servers arborl starts itself: a vLLM server as a child of the gateway.

With ``engine.kind: vllm`` and ``engine.launch: true``, ``arborl serve`` (and ``arborl up``)
start ``python -m vllm.entrypoints.openai.api_server`` from ``engine.python`` (vLLM's own venv)
on the port of ``engine.url``, with its output in ``RUN/vllm.log``, wait until it answers, and
stop it when the gateway stops: SIGTERM to its process group, SIGKILL after 30 s. The server
gets what the ``vllm`` engine needs of it: the RL routes (``VLLM_SERVER_DEV_MODE=1``) and the
logprobs of the sampling distribution (``--logprobs-mode processed_logprobs``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

DEFAULT_VLLM_PYTHON = "/opt/vllm-venv/bin/python"


class VllmServer:
    """One vLLM server process, serving ``model_dir`` on 127.0.0.1:``port``."""

    def __init__(self, python: str, model_dir: Path, port: int, log: Path, *, max_num_seqs: int = 16,
                 dtype: str = "auto", max_model_len: int | None = None, extra_args: tuple[str, ...] = (),
                 cpu_kv_cache_gib: int = 1):
        if not Path(python).is_file():
            raise FileNotFoundError(f"no python at {python} for the vLLM server (engine.python): install vLLM "
                                    "into a venv of its own (see the README)")
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                         "--served-model-name", model_dir.name, "--dtype", dtype,
                         "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port),
                         "--logprobs-mode", "processed_logprobs", "--enable-prompt-tokens-details",
                         *(("--max-model-len", str(max_model_len)) if max_model_len else ()), *extra_args]
        self._env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1",
                     "VLLM_CPU_KVCACHE_SPACE": str(cpu_kv_cache_gib)}
        self._process: subprocess.Popen | None = None

    @classmethod
    def for_url(cls, python: str, model_dir: Path, url: str, log: Path, **options) -> VllmServer:
        """A server on the loopback port ``url`` names (where the engine will look for it)."""
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
            raise ValueError(f"engine.url {url!r}: a server arborl starts listens on http://127.0.0.1:PORT")
        return cls(python, model_dir, parts.port, log, **options)

    def start(self, *, timeout_s: float = 900.0) -> None:
        """Start the server and wait until it answers (it compiles its model first: minutes on a CPU)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self._process = subprocess.Popen(self._command, env=self._env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self._process.returncode}; its log, "
                                   f"{self.log}, ends:\n{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer within {timeout_s:.0f} s; see {self.log}")

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
