"""Getting a trained policy into serving: in-process, or as a checkpoint through the admin route.

Checkpoints are ``save_pretrained`` folders (safetensors, Hugging Face layout; see
``learner.checkpoint``), so the same folder loads in transformers, in SGLang and in arborl's
embedded engine. A publisher is what the learner loop calls after each committed step:

- :class:`GatewayPublisher`: a gateway in another process loads the checkpoint folder;
- :class:`InProcessPublisher`: an embedded engine of the same process copies the weights.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

# The learner's whole weights, gathered when called (a collective on a multi-rank backend, so a
# publisher that sends a checkpoint folder never calls it).
Weights = Callable[[], Mapping[str, Any]]


class Publisher(Protocol):
    def publish(self, weights: Weights, checkpoint: Path, version: int) -> None: ...

    def served_version(self) -> int: ...


async def publish_in_process(engine, state_dict: Mapping[str, Any], version: int) -> None:
    """Swap the learner's weights into an embedded engine of the same process.

    The engine copies them into its own parameters between two decode steps; the caller awaits
    that before the next optimizer step changes them.
    """
    from arborl.gateway.engines.base import FromTensors

    await engine.load_weights(FromTensors(state_dict, version))


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


class GatewayPublisher:
    """Publish through the admin route of one gateway or several (several gateways of a run each
    serve every version: each is told in turn, and the version served is the lowest of theirs).
    Gateways that share engine servers each reload them: correct, and the reload costs that
    many times over."""

    def __init__(self, gateway_urls: str | Sequence[str], admin_token: str, *, timeout_s: float = 300.0):
        urls = [gateway_urls] if isinstance(gateway_urls, str) else list(gateway_urls)
        self.urls = [url.rstrip("/") for url in urls]
        if not self.urls:
            raise ValueError("GatewayPublisher needs at least one gateway URL")
        self.token, self.timeout_s = admin_token, timeout_s

    def publish(self, weights: Weights, checkpoint: Path, version: int) -> None:
        for url in self.urls:
            publish_to_gateway(url, self.token, checkpoint, version, timeout_s=self.timeout_s)

    def served_version(self) -> int:
        versions = []
        for url in self.urls:
            response = httpx.get(url + "/admin/policy", headers={"authorization": f"Bearer {self.token}"},
                                 timeout=self.timeout_s)
            response.raise_for_status()
            versions.append(int(response.json()["version"]))
        return min(versions)


class InProcessPublisher:
    """For a learner running in a thread beside the gateway's embedded engine.

    The engine's scheduler thread does the copy; this thread waits for it (on an event loop of
    its own), so the next optimizer step cannot change the weights mid-copy.
    """

    def __init__(self, engine):
        self.engine = engine

    def publish(self, weights: Weights, checkpoint: Path, version: int) -> None:
        asyncio.run(publish_in_process(self.engine, weights(), version))

    def served_version(self) -> int:
        return self.engine.stats().policy_version
