"""Publishing weights into a serving gateway: admin route, hot swap under load, refusals.

Eight clients stream completions while five new versions are published through
``POST /admin/weights``: no request may fail, every token records the version that produced it,
and versions never go down inside a call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from conftest import serve_live

ADMIN = "admin-secret-0123456789"


@pytest.fixture
def admin_gateway(tiny_model_dir: Path, tmp_path: Path):
    yield from serve_live(tiny_model_dir, tmp_path, admin_token=ADMIN)


def _checkpoints(engine, folder: Path, count: int) -> list[Path]:
    """``count`` perturbed copies of the served weights, as safetensors files."""
    tied = getattr(engine.model.config, "tie_word_embeddings", False)
    base = {k: v.detach().clone() for k, v in engine.model.state_dict().items() if not (tied and k == "lm_head.weight")}
    paths = []
    for version in range(1, count + 1):
        generator = torch.Generator().manual_seed(version)
        state = {k: (v + 0.01 * torch.randn(v.shape, generator=generator, dtype=v.dtype)).contiguous()
                 for k, v in base.items()}
        paths.append(folder / f"v{version}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def test_hot_swap_under_load(admin_gateway, tmp_path: Path):
    checkpoints = _checkpoints(admin_gateway.engine, tmp_path, 5)
    failures: list[BaseException] = []
    published = asyncio.Event()
    serving = asyncio.Event()  # a token of version 0 was streamed: the swaps come after it, however slow the machine

    async def client(index: int) -> int:
        api = openai.AsyncOpenAI(base_url=admin_gateway.url + f"/s/load-{index}/v1", api_key="k", max_retries=0)
        served = 0
        while not published.is_set() or served < 2:
            try:
                stream = await api.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"count {index}"}], max_tokens=24,
                    stream=True, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        serving.set()
                served += 1
            except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                failures.append(exc)
                return served
        return served

    async def publish() -> list[dict]:
        answers = []
        async with httpx.AsyncClient(base_url=admin_gateway.url, timeout=60,
                                     headers={"authorization": f"Bearer {ADMIN}"}) as http:
            await serving.wait()
            for version, path in enumerate(checkpoints, start=1):
                await asyncio.sleep(0.3)
                response = await http.post("/admin/weights", json={"path": str(path), "version": version})
                assert response.status_code == 200, response.text
                answers.append(response.json())
        published.set()
        return answers

    async def run():
        return await asyncio.gather(publish(), *(client(i) for i in range(8)))

    answers, *served = asyncio.run(run())
    assert failures == [] and all(n >= 2 for n in served)
    assert [a["version"] for a in answers] == [1, 2, 3, 4, 5]

    calls = [c for i in range(8) for c in admin_gateway.store.calls(f"load-{i}")]
    assert all(c.status == "ok" and len(c.completion_versions) == c.completion_len for c in calls)
    for call in calls:  # never back to an older policy inside a call
        assert call.completion_versions == sorted(call.completion_versions)
    assert {v for c in calls for v in c.completion_versions} >= {0, 5}
    metrics = admin_gateway.metrics()
    assert metrics["arborl_policy_version"] == 5 and metrics["arborl_weight_swap_seconds_count"] == 5
    policy = httpx.get(admin_gateway.url + "/admin/policy", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert policy["version"] == 5


def test_admin_routes_refuse_clearly(admin_gateway, tmp_path: Path):
    (good,) = _checkpoints(admin_gateway.engine, tmp_path, 1)
    bad = tmp_path / "bad.safetensors"
    save_file({"not.a.weight": torch.zeros(2)}, str(bad))
    url = admin_gateway.url + "/admin/weights"
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.post(url, json={"path": str(good), "version": 1}).status_code == 401
    assert httpx.post(url, json={"path": str(good), "version": 1},
                      headers={"authorization": "Bearer wrong"}).status_code == 401
    cases = [({"path": str(tmp_path / "absent"), "version": 1}, "path"), ({"path": str(bad), "version": 1}, "path"),
             ({"path": str(good), "version": 0}, "version"), ({"version": 1}, "path")]
    for body, param in cases:
        response = httpx.post(url, json=body, headers=auth)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert httpx.post(url, json={"path": str(good), "version": 1}, headers=auth).status_code == 200
    stale = httpx.post(url, json={"path": str(good), "version": 1}, headers=auth)
    assert stale.status_code == 400 and "must exceed" in stale.json()["error"]["message"]


def test_admin_routes_are_off_without_an_admin_token(gateway):
    response = httpx.get(gateway.url + "/admin/policy")
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"


def test_learner_publishes_a_trained_checkpoint_and_in_process(admin_gateway, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from arborl.learner.backends.torch_backend import TorchBackend
    from arborl.learner.checkpoint import save_checkpoint
    from arborl.learner.publish import publish_in_process, publish_to_gateway

    learner = AutoModelForCausalLM.from_pretrained(admin_gateway.engine.tokenizer.name_or_path)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.01)
    folder = save_checkpoint(tmp_path / "step-1", TorchBackend(learner))
    answer = publish_to_gateway(admin_gateway.url, ADMIN, folder, 1)
    assert answer["version"] == 1
    served = admin_gateway.engine.model.state_dict()
    for name, value in learner.state_dict().items():
        torch.testing.assert_close(served[name], value.to(served[name].dtype), rtol=0, atol=0)

    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.01)
    asyncio.run(publish_in_process(admin_gateway.engine, learner.state_dict(), 2))
    assert admin_gateway.engine.stats().policy_version == 2
    name, value = next(iter(learner.state_dict().items()))
    torch.testing.assert_close(admin_gateway.engine.model.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="must exceed"):
        publish_to_gateway(admin_gateway.url, ADMIN, folder, 2)

