"""A client that gives up during a long prefill and retries: the retry reuses the prefill.

An agent with a short total timeout (or one that was killed) closes its stream while the gateway
is still prefilling its long first prompt, then sends the same request again. The embedded engine
keeps the KV the abandoned request computed in the session's prefix cache, so the retry's prompt
is served from the cache up to where the first prefill got, in every dialect, over real HTTP.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from arborl.gateway.app import create_app
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.settings import GatewaySettings
from arborl.ops.local_gateway import ServerThread
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import LiveGateway

CHUNK = 16  # prompt tokens per engine step: a long prompt takes many steps to prefill
LONG = "Here is the repository's whole README, read it before you start. " * 60
STEPS_BEFORE_GIVING_UP = 4

ROUTES = {
    "chat": ("/v1/chat/completions", {"model": "tiny", "max_tokens": 4,
                                       "messages": [{"role": "user", "content": LONG}]}),
    "responses": ("/v1/responses", {"model": "tiny", "max_output_tokens": 4, "input": LONG}),
    "messages": ("/v1/messages", {"model": "tiny", "max_tokens": 4,
                                  "messages": [{"role": "user", "content": LONG}]}),
}


@pytest.fixture
def slow_prefill(tiny_model_dir: Path, tmp_path: Path):
    engine = EmbeddedEngine(tiny_model_dir, model_name="tiny", prefill_chunk=CHUNK)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(stream_keepalive_s=0.05)
    live = LiveGateway("", store, engine, create_app(engine, store, settings), tmp_path)
    with ServerThread(live.app, settings=settings) as url:
        live.url = url
        yield live
    store.close()


def _engine_steps(live: LiveGateway) -> float:
    return live.metrics().get("arborl_engine_step_seconds_count", 0.0)


@pytest.mark.parametrize("dialect", list(ROUTES))
def test_a_retry_after_an_abandoned_prefill_hits_the_prefix_cache(slow_prefill: LiveGateway, dialect: str):
    live = slow_prefill
    route, body = ROUTES[dialect]
    url = f"{live.url}/s/retry-{dialect}{route}"
    steps_at_start = _engine_steps(live)
    # The first try streams and gives up after a few prefill steps, before any token: its stream
    # has carried only the dialect's opening and keep-alives by then.
    with httpx.stream("POST", url, json=body | {"stream": True}, timeout=30) as response:
        assert response.status_code == 200
        for _ in response.iter_lines():
            if _engine_steps(live) - steps_at_start >= STEPS_BEFORE_GIVING_UP:
                break
    for _ in range(500):  # the engine notices the closed stream at its next step
        if live.engine.stats().running == 0:
            break
        time.sleep(0.01)
    (first,) = live.store.calls(f"retry-{dialect}")
    assert first.status == "cancelled" and first.completion_len == 0  # given up during the prefill
    hits_before = live.metrics().get("arborl_prefix_cache_hit_tokens_total", 0.0)

    retry = httpx.post(url, json=body, timeout=60)
    assert retry.status_code == 200, retry.text
    reused = live.metrics()["arborl_prefix_cache_hit_tokens_total"] - hits_before
    assert reused >= STEPS_BEFORE_GIVING_UP * CHUNK  # at least what the abandoned prefill computed
    assert reused < first.prompt_len  # and no more: that prefill had not finished
