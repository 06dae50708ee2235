"""What the hot-swap tests of the server engines (vLLM, SGLang) share: a changed checkpoint,
the cold-prefill logprob a swap must give, and clients streaming calls while versions change."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch


def perturbed_checkpoint(model: Path, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """``model`` with its first MLP's down projection tripled, saved with its tokenizer in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    changed = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    changed.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


@torch.no_grad()
def cold_first_logprob(weights: Path, prompt_ids: list[int]) -> float:
    """The greedy first token's logprob after ``prompt_ids`` under ``weights``, computed afresh."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    return float(torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1], dim=-1).max())


async def stream_calls(gateway_url: str, session: str, n: int, *, model: str, max_tokens: int,
                       **sampling: float) -> list[int]:
    """``n`` streamed calls of ``session``, one after another: each one's status, 599 for a stream
    that did not end with [DONE] or carried an error event."""
    async with httpx.AsyncClient(base_url=gateway_url, timeout=120) as client:
        statuses = []
        for i in range(n):
            async with client.stream("POST", f"/s/{session}/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": f"count {i}"}],
                    "max_tokens": max_tokens, "stream": True, **sampling}) as response:
                body = (await response.aread()).decode()
                statuses.append(response.status_code if "[DONE]" in body and '"error"' not in body else 599)
        return statuses
