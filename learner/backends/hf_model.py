"""What the torch and fsdp backends share about a Hugging Face causal LM: loading it, whether its
forward is noisy, and writing it as a safetensors folder.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(folder: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """The model in ``folder`` (a ``save_pretrained`` folder), on ``device``, in train mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    # ignore: transformers types PreTrainedModel.to as a _Wrapped that takes the model as its first argument
    return model.to(device).train()  # type: ignore[arg-type]


def load_frozen(folder: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """A model that is only scored (a teacher, the reference): eval mode, no gradients."""
    return load_causal_lm(folder, dtype=dtype, device=device).eval().requires_grad_(False)


def forward_is_deterministic(model: torch.nn.Module) -> bool:
    """Whether two forwards of one batch give the same logprobs: in eval mode, or in train mode
    with no dropout or router noise configured (Llama and Qwen train with none)."""
    if not model.training:
        return True
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules()):
        return False
    config = getattr(model, "config", None)
    return not any(("dropout" in key or "jitter" in key) and isinstance(value, (int, float)) and value > 0
                   for key, value in vars(config).items())
