"""Faults of an engine server, for both server engines (vLLM, SGLang): down, slow, or answering
garbage. Each gives the client a 503 (529 for Anthropic) with Retry-After in its dialect's format,
never a 500, and no call is recorded with tokens the server did not sample.

The broken servers here are fault injectors, not stand-ins for vLLM or SGLang: they answer the
routes an engine reads when it connects, and then break the generation request on purpose.
The engines against real servers are test_vllm_engine.py, test_vllm_replicas.py and (GPU)
test_sglang_engine.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from arborl.gateway.app import create_app
from arborl.gateway.engines.sglang_server import SglangEngine
from arborl.gateway.engines.vllm_server import VllmEngine
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import ServerThread

GENERATE = {VllmEngine: "/v1/completions", SglangEngine: "/generate"}


def _broken_server(fault: str, generate_path: str) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": [{"id": "tiny", "max_model_len": 2048}]}

    @app.get("/get_server_info")
    async def server_info() -> dict:
        return {"context_length": 2048}

    @app.get("/weight_info")
    @app.get("/get_weight_version")
    async def weight_version() -> dict:
        return {"weight_version": "default"}

    @app.post(generate_path)
    async def generate():
        if fault == "slow":
            await asyncio.sleep(5)  # the engine's timeout_s is 1
        if fault == "status":
            return JSONResponse({"error": {"message": "engine core died"}}, status_code=500)

        async def body():
            if fault == "garbage":
                yield b"data: <html>Bad Gateway</html>\n\n"
            else:  # "miscounted": ids without their logprobs, in either server's format
                yield (b'data: {"choices": [{"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.1]}}], '
                       b'"meta_info": {"completion_tokens": 2, "output_token_logprobs": [[-0.1, 5, null]]}}\n\n')
        return StreamingResponse(body(), media_type="text/event-stream")

    return app


@pytest.fixture(params=[VllmEngine, SglangEngine], ids=["vllm", "sglang"])
def engine_kind(request):
    return request.param


def _gateway(engine, tmp_path: Path) -> Iterator[tuple[str, SqliteTrajectoryStore]]:
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(any_model_name=True)
    with ServerThread(create_app(engine, store, settings), settings=settings) as url:
        yield url, store
    store.close()


def _assert_unavailable(url: str) -> None:
    chat = httpx.post(url + "/s/chat/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 503 and chat.headers.get("retry-after"), chat.text
    assert chat.json()["error"]["message"]
    messages = httpx.post(url + "/s/messages/v1/messages", timeout=30, json={
        "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 529 and messages.headers.get("retry-after"), messages.text
    assert messages.json()["error"]["type"] == "overloaded_error"
    with httpx.stream("POST", url + "/s/stream/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True}) as streamed:
        body = streamed.read().decode()
    # the stream's 200 went first: it ends with the dialect's error event instead of a completion
    assert streamed.status_code == 200 and '"code":"engine_unavailable"' in body.strip().splitlines()[-1], body


@pytest.mark.parametrize("fault", ["garbage", "miscounted", pytest.param("slow", marks=pytest.mark.slow), "status"])
def test_a_broken_server_is_a_503_and_records_no_tokens(engine_kind, fault, tiny_model_dir, tmp_path):
    with ServerThread(_broken_server(fault, GENERATE[engine_kind])) as server_url:
        engine = engine_kind(server_url, tiny_model_dir, model_name="tiny", timeout_s=1.0)
        for url, store in _gateway(engine, tmp_path):
            _assert_unavailable(url)
            for session in ("chat", "messages", "stream"):
                for call in store.calls(session):
                    assert call.status == "error" and call.completion_len == 0, call


def test_a_server_that_went_down_is_a_503_and_not_ready(engine_kind, tiny_model_dir, tmp_path):
    """(A server that is down when the gateway starts stops the start, saying where it looked:
    test_vllm_engine.py.)"""
    server = ServerThread(_broken_server("garbage", GENERATE[engine_kind]))
    engine = engine_kind(server.start(), tiny_model_dir, model_name="tiny")
    for url, _ in _gateway(engine, tmp_path):
        assert httpx.get(url + "/readyz").status_code == 200
        server.stop()  # nothing listens on its port now
        _assert_unavailable(url)
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503 and not ready.json()["ready"]
