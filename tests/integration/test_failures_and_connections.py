"""Failures after the 200, 500s, and connections, over real HTTP on loopback.

- An engine that breaks mid-stream with an error that is none of the gateway's own (a bug, say):
  every dialect's stream ends with its own error event (Chat: an ``error`` chunk; Anthropic:
  ``event: error``; Responses: ``response.failed``), and the call is recorded with its error.
- A 500 is a complete answer: the keep-alive connection it came on serves the next request.
- Rendering and tokenising run off the event loop; a prompt of megabytes is refused before it is
  tokenised at all.
- A connection that sends half a request head is closed after ``header_timeout_s``; one whose
  head grows past ``max_header_bytes`` gets a 431.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.ops.local_gateway import ServerThread
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore
from conftest import LiveGateway, start_gateway
from scripted_engine import ScriptedEngine
from sse import sse_events

USER = {"role": "user", "content": "Say hi."}


class BreaksMidStream(ScriptedEngine):
    """The scripted engine, raising a plain RuntimeError after its third token (a bug in an engine)."""

    def generate(self, prompt_ids, params, *, cache_key=None):
        return self._breaking(super().generate(prompt_ids, params, cache_key=cache_key))

    async def _breaking(self, tokens):
        async for n, event in _enumerate(tokens):
            if n == 3:
                raise RuntimeError("engine bug: index out of range")
            yield event


async def _enumerate(stream):
    n = 0
    async for item in stream:
        yield n, item
        n += 1


@pytest.fixture(scope="module")
def broken(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    engine = BreaksMidStream(AutoTokenizer.from_pretrained(tiny_model_dir), lambda prompt: "one two three four five")
    store = SqliteTrajectoryStore(tmp_path_factory.mktemp("broken") / "store.sqlite")
    with ServerThread(create_app(engine, store, GatewaySettings())) as url:
        yield url, store
    store.close()


def _recorded_error(store: TrajectoryStore, session: str) -> str:
    (call,) = store.calls(session)
    assert call.status == "error" and call.completion_len == 3, call
    return store.call_bodies(call.id)["error"]


def test_chat_stream_ends_with_an_error_chunk(broken):
    url, store = broken
    body = {"model": "tiny", "messages": [USER], "stream": True}
    with httpx.stream("POST", url + "/s/chat-broken/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    last = json.loads(data[-1])
    assert set(last) == {"error"} and last["error"]["type"] == "server_error", last
    assert "RuntimeError" in _recorded_error(store, "chat-broken")


def test_anthropic_stream_ends_with_an_error_event(broken):
    url, store = broken
    body = {"model": "tiny", "max_tokens": 20, "messages": [USER], "stream": True}
    with httpx.stream("POST", url + "/s/msg-broken/v1/messages", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = sse_events(response)
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "api_error", events[-1]
    assert "message_stop" not in [n for n, _ in events]
    assert "RuntimeError" in _recorded_error(store, "msg-broken")


def test_responses_stream_ends_with_response_failed(broken):
    url, store = broken
    body = {"model": "tiny", "input": "Say hi.", "stream": True}
    with httpx.stream("POST", url + "/s/resp-broken/v1/responses", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = sse_events(response)
    name, data = events[-1]
    assert name == "response.failed" and data["response"]["status"] == "failed", events[-1]
    assert data["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert "RuntimeError" in _recorded_error(store, "resp-broken")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
def test_a_500_keeps_the_keep_alive_connection_usable(broken, route):
    """The non-streaming request fails with a 500 in the dialect's format; the same connection
    then serves /healthz (before, the server dropped it silently and the next request was reset)."""
    url, _ = broken
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "tiny", "max_tokens": 20, "messages": [USER]}
    connection.request("POST", route, body=json.dumps(body), headers={"content-type": "application/json"})
    failed = connection.getresponse()
    payload = json.loads(failed.read())
    assert failed.status == 500, payload
    assert "error" in payload and failed.getheader("connection") != "close"
    sock = connection.sock
    connection.request("GET", "/healthz")
    healthy = connection.getresponse()
    assert healthy.status == 200 and json.loads(healthy.read()) == {"status": "ok"}
    assert connection.sock is sock, "the client had to open a new connection"
    connection.close()


class SlowToFirstToken(ScriptedEngine):
    """The scripted engine, silent for 1.5 s before its first token (a long prefill on a busy CPU)."""

    async def _stream(self, prompt_ids, params):
        await asyncio.sleep(1.5)
        async for event in super()._stream(prompt_ids, params):
            yield event


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/chat/completions", {"model": "tiny", "messages": [USER], "stream": True}),
    ("/v1/responses", {"model": "tiny", "input": "Say hi.", "stream": True}),
    ("/v1/messages", {"model": "tiny", "max_tokens": 20, "messages": [USER], "stream": True}),
], ids=["chat", "responses", "messages"])
def test_a_long_prefill_does_not_trip_a_clients_read_timeout(tiny_model_dir: Path, tmp_path: Path, route, body):
    """Every dialect sends its keep-alive while nothing else comes, so a client with a read timeout
    shorter than the prefill keeps reading (it used to give up, and retry the whole prefill)."""
    from transformers import AutoTokenizer

    engine = SlowToFirstToken(AutoTokenizer.from_pretrained(tiny_model_dir), lambda prompt: "all done here")
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(stream_keepalive_s=0.1)
    with ServerThread(create_app(engine, store, settings), settings=settings) as url:
        with httpx.stream("POST", url + route, json=body, timeout=httpx.Timeout(30, read=0.5)) as response:
            assert response.status_code == 200
            text = response.read().decode()
    # Chat: SSE comments. Anthropic: its ping event. Responses: response.in_progress again, an event
    # (Codex's idle timeout counts events only; tests/e2e/test_codex.py shows it waits).
    keepalive = {"/v1/chat/completions": ": keep-alive", "/v1/messages": "event: ping",
                 "/v1/responses": "event: response.in_progress"}[route]
    assert text.count(keepalive) >= 2, text
    (call,) = store.calls(store.sessions()[0]["id"])
    assert call.status == "ok" and call.response_message["content"] == "all done here"
    store.close()


# -- work off the event loop ----------------------------------------------------------------------------


@pytest.fixture
def traced(tiny_model_dir: Path, tmp_path: Path):
    """A gateway whose renderer notes the thread and length of every text it tokenises."""
    server, live = start_gateway(tiny_model_dir, tmp_path)
    encoded: list[tuple[str, int]] = []
    renderer = live.app.state.gateway.renderer
    original = renderer.encode

    def encode(text: str) -> list[int]:
        encoded.append((threading.current_thread().name, len(text)))
        return original(text)

    renderer.encode = encode
    with server as url:
        live.url = url
        yield live, encoded
    live.store.close()


def test_prompts_are_tokenised_off_the_event_loop(traced):
    live, encoded = traced
    for route, body in [
        ("/v1/chat/completions", {"model": "tiny", "messages": [USER], "max_tokens": 2}),
        ("/v1/responses", {"model": "tiny", "input": "Say hi.", "max_output_tokens": 2}),
        ("/v1/messages", {"model": "tiny", "messages": [USER], "max_tokens": 2}),
        ("/v1/messages/count_tokens", {"model": "tiny", "messages": [USER]}),
    ]:
        response = httpx.post(live.url + route, json=body, timeout=60)
        assert response.status_code == 200, (route, response.text)
    assert len(encoded) >= 4
    # ServerThread runs uvicorn's event loop in the thread named "gateway".
    assert all(thread != "gateway" for thread, _ in encoded), encoded


def test_a_prompt_of_megabytes_is_refused_without_tokenising_it(traced):
    live, encoded = traced
    prompt = "lantern " * 2_500_000  # 20 MB: under the 32 MB body limit, a thousand times the context
    for route, body, code_of in [
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": prompt}]},
         lambda b: b["error"]["code"]),
        ("/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]},
         lambda b: "context_length_exceeded" if "prompt is too long" in b["error"]["message"] else b),
    ]:
        response = httpx.post(live.url + route, json=body, timeout=120)
        assert response.status_code == 400, response.text[:300]
        assert code_of(response.json()) == "context_length_exceeded", response.text[:300]
    assert "at least" in httpx.post(live.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": prompt}]}).json()["error"]["message"]
    assert all(length < 1_000_000 for _, length in encoded), [length for _, length in encoded]
    assert httpx.get(live.url + "/healthz").status_code == 200


# -- connections ----------------------------------------------------------------------------------------


@pytest.fixture
def strict_server(tiny_model_dir: Path, tmp_path: Path):
    server, live = start_gateway(tiny_model_dir, tmp_path, header_timeout_s=0.5, max_header_bytes=4096)
    with server as url:
        live.url = url
        yield live
    live.store.close()


def _connect(live: LiveGateway) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False


def test_a_connection_with_an_incomplete_head_is_closed(strict_server: LiveGateway):
    partial = _connect(strict_server)
    partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
    silent = _connect(strict_server)  # never sends a byte
    started = time.monotonic()
    assert _closed_by_server(partial, within_s=5), "a half-sent head held the connection open"
    assert _closed_by_server(silent, within_s=5), "a connection that sent nothing was held open"
    assert time.monotonic() - started < 5
    partial.close()
    silent.close()
    # A slow but complete request is served; the deadline does not cut a response being computed.
    assert httpx.post(strict_server.v1 + "/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [USER], "max_tokens": 2}).status_code == 200


def test_an_oversized_head_gets_431(strict_server: LiveGateway):
    sock = _connect(strict_server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 8000 + b"\r\n\r\n")
    reply = sock.recv(1024)
    assert reply.startswith(b"HTTP/1.1 431"), reply
    sock.close()
    assert httpx.get(strict_server.url + "/healthz", headers={"x-small": "b" * 1000}).status_code == 200


def test_every_request_is_logged_and_an_abandoned_stream_counts_as_499(gateway: LiveGateway, caplog):
    """One access line per request (method, route, session, status, tokens; never the body), and a
    stream the client left is 499 in /metrics, as the store records it cancelled."""
    caplog.set_level(logging.INFO, logger="arborl.access")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "secret words"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", gateway.url + "/s/left-early/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":' in line and '"content":""' not in line:
                break  # hang up after the first token
    assert httpx.post(gateway.url + "/s/stayed/v1/chat/completions", timeout=60,
                      json={**body, "stream": False, "max_tokens": 3}).status_code == 200
    deadline = time.time() + 30
    while not (calls := gateway.store.calls("left-early")):
        assert time.time() < deadline
        time.sleep(0.05)
    assert calls[0].status == "cancelled"
    deadline = time.time() + 30
    while gateway.metrics().get("arborl_requests_total{route=/v1/chat/completions,status=499}") is None:
        assert time.time() < deadline, gateway.metrics()
        time.sleep(0.05)
    metrics = gateway.metrics()
    route = "/v1/chat/completions"  # the route's label, with or without the /s/{session_id} prefix
    assert metrics.get(f"arborl_requests_total{{route={route},status=499}}") == 1, metrics
    assert metrics.get(f"arborl_requests_total{{route={route},status=200}}") == 1, metrics
    lines = [r.getMessage() for r in caplog.records if r.name == "arborl.access"]
    left = [line for line in lines if "session=left-early" in line]
    stayed = [line for line in lines if "session=stayed" in line]
    assert len(left) == 1 and "status=499" in left[0] and route in left[0], lines
    assert len(stayed) == 1 and "status=200" in stayed[0] and "completion_tokens=3" in stayed[0], lines
    assert not any("secret words" in line for line in lines)
