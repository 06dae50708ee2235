"""Backpressure (a bounded engine queue) and API keys, in each dialect's error format."""

from __future__ import annotations

import threading
import time

import anthropic
import httpx
import openai
import pytest

from arborl.gateway.app import create_app
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import ServerThread

LONG = {"model": "tiny", "max_tokens": 1500, "ignore_eos": True, "stream": True,
        "messages": [{"role": "user", "content": "go on"}]}


def _serve(model_dir, run_dir, engine_options=None, **settings):
    engine = EmbeddedEngine(model_dir, model_name="tiny", **(engine_options or {}))
    store = SqliteTrajectoryStore(run_dir / "store.sqlite")
    return ServerThread(create_app(engine, store, GatewaySettings(**settings))), engine


def test_full_queue_is_refused_with_retry_after(tiny_model_dir, tmp_path):
    server, engine = _serve(tiny_model_dir, tmp_path, {"max_running": 1}, max_waiting=1)
    with server as url:
        def hold() -> None:  # a streaming client that reads everything, slowly enough to keep its slot
            with httpx.stream("POST", url + "/v1/chat/completions", json=LONG, timeout=120) as response:
                for _ in response.iter_lines():
                    pass

        holders = [threading.Thread(target=hold) for _ in range(2)]
        for holder in holders:
            holder.start()
            time.sleep(0.3)
        deadline = time.time() + 30
        while engine.stats().waiting < 1:  # one running, one waiting: the queue is full
            assert time.time() < deadline, engine.stats()
            time.sleep(0.02)

        refused = httpx.post(url + "/v1/chat/completions", json={**LONG, "stream": False}, timeout=30)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1" and refused.headers["x-should-retry"] == "true"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        overloaded = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 5,
                                                             "messages": [{"role": "user", "content": "x"}]})
        assert overloaded.status_code == 529
        assert overloaded.json()["error"]["type"] == "overloaded_error"
        assert "retry-after" in overloaded.headers
        for holder in holders:
            holder.join(timeout=120)
        # the queue drained: requests are served again
        ok = httpx.post(url + "/v1/chat/completions", json={**LONG, "stream": False, "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_keys_required_off_loopback(tiny_model_dir, tmp_path, host):
    server, _ = _serve(tiny_model_dir, tmp_path, host=host, api_keys=["sk-good-0123456789abcdef"])
    with server as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-bad", max_retries=0).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        good = openai.OpenAI(base_url=url + "/v1", api_key="sk-good-0123456789abcdef", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="sk-bad", max_retries=0).messages.create(
                model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        # x-api-key (Anthropic's header) and Bearer both carry the key
        assert anthropic.Anthropic(base_url=url, api_key="sk-good-0123456789abcdef", max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        missing = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"


def test_no_keys_needed_on_loopback_unless_configured(tiny_model_dir, tmp_path):
    server, _ = _serve(tiny_model_dir, tmp_path, host="127.0.0.1")
    with server as url:
        response = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200


def test_retry_hints_and_root_probe(gateway):
    wrong = httpx.post(gateway.v1 + "/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                              "content": "x"}]})
    assert wrong.status_code == 404 and wrong.headers["x-should-retry"] == "false"
    assert httpx.head(gateway.url + "/").status_code == 200
