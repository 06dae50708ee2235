"""The ``upstream`` engine: arborl forwarding to another server, in every dialect, and its failures.

The upstream is a real arborl gateway serving the tool-calling tiny model (it speaks both the
OpenAI and the Anthropic API), so tool calls really travel both ways. Failures come from small
misbehaving servers on loopback: refusing connections, never answering, refusing the key,
rate limiting, breaking off a stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.gateway.upstream import UpstreamEngine
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore
from conftest import ServerThread, free_port, serve_live
from tool_caller import CALL_ARGUMENTS, WEATHER_TOOL

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def upstream(tool_model_dir: Path, tmp_path: Path):
    yield from serve_live(tool_model_dir, tmp_path / "upstream")


def _forwarder(url: str, api: str, store_dir: Path, **engine_options) -> tuple[ServerThread, TrajectoryStore]:
    engine = UpstreamEngine(url, model="tiny", api=api, api_key="upstream-key", served_name="policy",
                            **engine_options)
    store = SqliteTrajectoryStore(store_dir / "store.sqlite")
    return ServerThread(create_app(engine, store, GatewaySettings())), store


@pytest.fixture(params=["openai", "anthropic"])
def forwarder(request, upstream, tmp_path: Path) -> Iterator[tuple[str, TrajectoryStore, object]]:
    url = upstream.v1 if request.param == "openai" else upstream.url
    server, store = _forwarder(url, request.param, tmp_path)
    with server as forward_url:
        yield forward_url, store, upstream
    store.close()


def test_chat_completions_forwarded_with_tools_streaming_and_not(forwarder):
    url, store, upstream = forwarder
    client = openai.OpenAI(base_url=url + "/s/fwd/v1", api_key="k", max_retries=0)
    reply = client.chat.completions.create(model="policy", messages=ASK, tools=[WEATHER_TOOL], max_tokens=60,
                                           temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL_ARGUMENTS
    assert reply.choices[0].finish_reason == "tool_calls" and reply.usage.prompt_tokens > 0

    stream = client.chat.completions.create(model="policy", messages=ASK, tools=[WEATHER_TOOL], max_tokens=60,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in chunks
                        if c.choices and c.choices[0].delta.tool_calls)
    assert json.loads(arguments) == CALL_ARGUMENTS and chunks[-1].usage.completion_tokens > 0

    calls = store.calls("fwd")
    assert [c.status for c in calls] == ["ok", "ok"] and not any(c.token_exact for c in calls)
    assert [c.prompt_len + c.completion_len for c in calls] == [0, 0]  # no tokenizer: text only
    assert store.call_bodies(calls[0].id)["tool_calls"][0]["name"] == "get_weather"
    assert len(upstream.store.calls(upstream.store.sessions()[0]["id"])) == 2  # both really went upstream


def test_messages_and_responses_forwarded(forwarder):
    url, store, _ = forwarder
    client = anthropic.Anthropic(base_url=url + "/s/fwd", api_key="k", max_retries=0)
    tool = {"name": "get_weather", "description": "Current weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    with client.messages.stream(model="policy", max_tokens=60, tools=[tool], messages=ASK,
                                extra_body={"temperature": 0}) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [b.input for b in message.content if b.type == "tool_use"] == [CALL_ARGUMENTS]

    responses = openai.OpenAI(base_url=url + "/s/fwd/v1", api_key="k", max_retries=0)
    response = responses.responses.create(model="policy", input="Say hi", max_output_tokens=8)
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens > 0
    assert [c.dialect for c in store.calls("fwd")] == ["anthropic_messages", "openai_responses"]


def test_gemini_forwarded_with_a_function_call(forwarder):
    """A Gemini client over an OpenAI or Anthropic upstream: the call and its usage in Google's shape."""
    url, store, _ = forwarder
    body = {"contents": [{"role": "user", "parts": [{"text": ASK[0]["content"]}]}],
            "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Current weather in a city",
                                                 "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]}]}],
            "generationConfig": {"temperature": 0, "maxOutputTokens": 60}}
    reply = httpx.post(url + "/s/fwd/v1beta/models/policy:generateContent", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    candidate = reply.json()["candidates"][0]
    assert [p["functionCall"]["args"] for p in candidate["content"]["parts"] if "functionCall" in p] == [
        CALL_ARGUMENTS]
    assert reply.json()["usageMetadata"]["promptTokenCount"] > 0
    with httpx.stream("POST", url + "/s/fwd/v1beta/models/policy:streamGenerateContent?alt=sse", json=body,
                      timeout=60) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")]
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert [c.dialect for c in store.calls("fwd")] == ["gemini", "gemini"]


def test_a_tokenizer_gives_upstream_calls_token_ids_marked_not_exact(upstream, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(upstream.engine.tokenizer.name_or_path)
    server, store = _forwarder(upstream.v1, "openai", tmp_path, tokenizer=tokenizer)
    with server as url:
        openai.OpenAI(base_url=url + "/s/t/v1", api_key="k").chat.completions.create(
            model="policy", messages=ASK, tools=[WEATHER_TOOL], max_tokens=60, temperature=0)
    (call,) = store.calls("t")
    assert call.prompt_len > 0 and call.completion_len > 0 and not call.token_exact
    assert set(call.completion_versions) == {-1}  # no policy version produced these


# -- failures -----------------------------------------------------------------------------------


def _error_server(status: int, body: dict, headers: dict | None = None) -> ServerThread:
    async def refuse(request):
        return JSONResponse(body, status_code=status, headers=headers)

    return ServerThread(Starlette(routes=[Route("/v1/chat/completions", refuse, methods=["POST"]),
                                          Route("/v1/messages", refuse, methods=["POST"])]))


def _broken_stream_server() -> ServerThread:
    """Sends one chunk, then closes the stream without finishing the completion."""

    async def half(request):
        async def body():
            chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    return ServerThread(Starlette(routes=[Route("/v1/chat/completions", half, methods=["POST"])]))


class _SilentServer:
    """Accepts connections and never answers (an upstream that hangs)."""

    def __enter__(self) -> str:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def _forward_once(upstream_url: str, tmp_path: Path, *, api: str = "openai", dialect: str = "chat", stream=False,
                  **engine_options) -> tuple[httpx.Response, TrajectoryStore]:
    server, store = _forwarder(upstream_url, api, tmp_path, **engine_options)
    with server as url:
        if dialect == "chat":
            path, body = "/s/f/v1/chat/completions", {"model": "policy", "messages": ASK, "stream": stream}
        elif dialect == "messages":
            path, body = "/s/f/v1/messages", {"model": "policy", "messages": ASK, "max_tokens": 8, "stream": stream}
        elif dialect == "gemini":
            method = "streamGenerateContent?alt=sse" if stream else "generateContent"
            path, body = f"/s/f/v1beta/models/policy:{method}", {"contents": [{"parts": [{"text": "hi"}]}]}
        else:
            path, body = "/s/f/v1/responses", {"model": "policy", "input": "hi", "stream": stream}
        response = httpx.post(url + path, json=body, timeout=30)
    return response, store


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dialect,status,error_type", [
    ("chat", 502, "api_error"), ("messages", 502, "api_error"), ("responses", 502, "api_error"),
    ("gemini", 502, "UNAVAILABLE")])
def test_unreachable_upstream_is_a_502_in_each_dialect(dialect, status, error_type, stream, tmp_path):
    """Streaming or not: the upstream is reached before the client's response starts."""
    response, store = _forward_once(f"http://127.0.0.1:{free_port()}/v1", tmp_path, dialect=dialect,
                                    stream=stream)
    assert response.status_code == status
    body = response.json()
    error = body["error"]
    assert error.get("type", error.get("status")) == error_type and "upstream" in error["message"]
    if dialect == "gemini":
        assert error["code"] == 502 and set(error) == {"code", "message", "status"}
    elif dialect == "messages":
        assert body["type"] == "error"
    else:
        assert error["code"] == "upstream_error"
    assert response.headers["x-should-retry"] == "true"
    (call,) = store.calls("f")
    assert call.status == "error"  # the failed call is recorded too


@pytest.mark.parametrize("stream", [False, True])
def test_hanging_upstream_is_a_504_not_a_hang(stream, tmp_path):
    with _SilentServer() as url:
        response, store = _forward_once(url + "/v1", tmp_path, timeout_s=0.5, stream=stream)
    assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"
    assert store.calls("f")[0].status == "error"


@pytest.mark.parametrize("status,expected,code", [
    (401, 502, "upstream_error"), (404, 502, "upstream_error"), (500, 502, "upstream_error"),
    (529, 502, "upstream_error"), (429, 429, "rate_limit_exceeded"), (400, 400, None)])
def test_upstream_http_errors_map_to_the_clients_dialect(status, expected, code, tmp_path):
    with _error_server(status, {"error": {"message": "nope", "type": "x"}}, {"retry-after": "7"}) as url:
        response, _ = _forward_once(url + "/v1", tmp_path)
    assert response.status_code == expected
    assert response.json()["error"]["code"] == code and "nope" in response.json()["error"]["message"]
    if expected == 429:
        assert response.headers["retry-after"] == "7"


def test_anthropic_upstream_errors_reach_an_anthropic_client_as_anthropic_errors(tmp_path):
    with _error_server(529, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}) as url:
        response, _ = _forward_once(url, tmp_path, api="anthropic", dialect="messages")
    assert response.status_code == 502
    assert response.json() == {"type": "error", "error": {"type": "api_error",
                                                          "message": "the upstream answered 529: busy"}}


def test_a_stream_broken_off_upstream_ends_with_an_error_and_is_recorded(tmp_path):
    with _broken_stream_server() as url:
        response, store = _forward_once(url + "/v1", tmp_path, stream=True)
    assert response.status_code == 200  # headers went out before the upstream broke off
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert '"Hel"' in events[1] and json.loads(events[-1])["error"]["code"] == "upstream_error"
    (call,) = store.calls("f")
    assert call.status == "error" and "closed the stream" in store.call_bodies(call.id)["error"]


def test_many_concurrent_forwarded_calls_are_all_recorded(upstream, tmp_path):
    server, store = _forwarder(upstream.v1, "openai", tmp_path)

    async def run(url: str) -> None:
        client = openai.AsyncOpenAI(base_url=url + "/s/many/v1", api_key="k", max_retries=0)
        await asyncio.gather(*(client.chat.completions.create(model="policy", messages=ASK, max_tokens=4)
                               for _ in range(16)))

    with server as url:
        asyncio.run(run(url))
    assert [c.status for c in store.calls("many")] == ["ok"] * 16


def test_n_choices_are_n_upstream_calls(forwarder):
    url, store, _ = forwarder
    reply = openai.OpenAI(base_url=url + "/s/n/v1", api_key="k", max_retries=0).chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.status for c in store.calls("n")] == ["ok", "ok"]
