"""Getting a trained policy into serving: in-process, or as a checkpoint through the admin route.

Checkpoints are ``save_pretrained`` folders (safetensors, Hugging Face layout), so the same
folder loads in transformers, in SGLang and in arborl's embedded engine.
"""

from __future__ import annotations

from pathlib import Path

import httpx


def save_checkpoint(model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


async def publish_in_process(engine, model, version: int) -> None:
    """Swap the learner's weights into an embedded engine of the same process.

    The engine copies them into its own parameters between two decode steps; the caller awaits
    that before the next optimizer step changes them.
    """
    await engine.load_weights(model.state_dict(), version)


def publish_to_gateway(gateway_url: str, admin_token: str, checkpoint: Path, version: int,
                       *, timeout_s: float = 300.0) -> dict:
    """Ask a gateway in another process to serve ``checkpoint`` as ``version``."""
    response = httpx.post(
        gateway_url.rstrip("/") + "/admin/weights", json={"path": str(checkpoint), "version": version},
        headers={"authorization": f"Bearer {admin_token}"}, timeout=timeout_s,
    )
    if response.status_code != 200:
        raise RuntimeError(f"the gateway refused version {version}: {response.status_code} {response.text}")
    return response.json()
