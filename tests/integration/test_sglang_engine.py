"""The ``sglang`` engine against a real SGLang server: GPU only (``pytest -m gpu``; SGLang has no
CPU kernels on PyPI). The dialects, stitching and recorded ids run for it in
test_dialect_conformance.py; here, publishing under load and a refused checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from engine_checks import cold_first_logprob, perturbed_checkpoint, stream_calls

from arborl.gateway.app import create_app
from arborl.gateway.engines.sglang_server import SglangEngine
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore
from conftest import ServerThread

pytestmark = pytest.mark.gpu
ADMIN = "sglang-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def gateway(sglang_default, tmp_path: Path) -> Iterator[tuple[str, TrajectoryStore, SglangEngine]]:
    url, model = sglang_default
    engine = SglangEngine(url, model, model_name="policy", max_running=8)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(admin_token=ADMIN, any_model_name=True)
    with ServerThread(create_app(engine, store, settings), settings=settings) as gateway_url:
        yield gateway_url, store, engine
    store.close()


def _first_logprob(url: str, prompt_ids: list[int]) -> float:
    body = {"input_ids": prompt_ids, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    return httpx.post(url + "/generate", json=body, timeout=60).json()["meta_info"]["output_token_logprobs"][0][0]


def test_checkpoints_published_while_clients_stream_swap_in_without_a_failure(sglang_default, gateway, tmp_path):
    url, model = sglang_default
    gateway_url, store, engine = gateway
    probe = [1, 504, 3145, 28, 12, 9]
    changed = perturbed_checkpoint(model, tmp_path / "changed", torch.bfloat16)
    _first_logprob(url, probe)  # the probe's prefix is now in the radix cache, under the old weights

    async def run() -> list[list[int]]:
        clients = [asyncio.create_task(stream_calls(gateway_url, f"swap-{c}", 4, model="policy", max_tokens=32))
                   for c in range(8)]
        async with httpx.AsyncClient(timeout=300) as admin:
            for version, checkpoint in ((1, model), (2, changed), (3, changed)):
                await asyncio.sleep(0.5)
                published = await admin.post(gateway_url + "/admin/weights", headers=AUTH,
                                              json={"path": str(checkpoint), "version": version})
                assert published.status_code == 200, published.text
        return await asyncio.gather(*clients)

    statuses = asyncio.run(run())
    assert all(status == 200 for client in statuses for status in client), statuses
    assert engine.stats().policy_version == 3
    assert httpx.get(url + "/get_weight_version", timeout=5).json()["weight_version"] == "3"
    for c in range(8):
        calls = store.calls(f"swap-{c}")
        assert all(call.status == "ok" and len(set(call.completion_versions)) == 1 for call in calls)
        versions = [call.completion_versions[0] for call in calls]
        assert versions == sorted(versions)
    # bfloat16 on the GPU against float32 here: close, not exact
    assert _first_logprob(url, probe) == pytest.approx(cold_first_logprob(changed, probe), abs=0.05)


def test_a_checkpoint_sglang_refuses_leaves_the_old_weights_serving(gateway, tmp_path):
    gateway_url, _, engine = gateway
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    before = engine.stats().policy_version
    published = httpx.post(gateway_url + "/admin/weights", headers=AUTH,
                           json={"path": str(broken), "version": before + 1}, timeout=300)
    assert published.status_code == 400, published.text
    assert engine.stats().policy_version == before
    reply = httpx.post(gateway_url + "/v1/chat/completions", timeout=60, json={
        "model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text
