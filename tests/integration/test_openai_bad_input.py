"""Bad input to ``POST /v1/chat/completions`` over real HTTP: every refusal is a 4xx in OpenAI's error format.

A table of raw requests (sent with httpx, byte for byte) against a live gateway, each with the
status, and where it matters the ``param`` / ``code``, that OpenAI would answer. After the
table the gateway must still serve a normal request and must not have answered any 5xx. Then
the official ``openai`` SDK sees the same refusals as typed exceptions, and a client that hangs
up mid-stream leaves a ``cancelled`` call in the store and no engine slot behind.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import LiveGateway, start_gateway

MODEL = "tiny"
SMALL_BODY_LIMIT = 10_000
CHAT_ROUTE = "/v1/chat/completions"
SENT: Counter[str] = Counter()  # requests this module sent to each shared gateway's chat route
USER = {"role": "user", "content": "Say hi."}
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat(**fields: Any) -> dict[str, Any]:
    """A valid, short request body with ``fields`` replaced (``None`` deletes a field)."""
    body: dict[str, Any] = {"model": MODEL, "messages": [USER], "max_tokens": 2}
    for key, value in fields.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def long_prompt(chars: int = 30_000) -> str:
    """Varied words, so the tokenizer cannot merge them: ~30k characters is ~11k tokens of the tiny model."""
    rng = random.Random(1234)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "quantum", "purple", "seven", "lantern",
             "orchard", "velvet", "cobalt", "meadow"]
    text = " ".join(f"{rng.choice(words)}{rng.randint(0, 999)}" for _ in range(chars // 6))
    return text[:chars]


def chunked(payload: bytes, size: int = 1000) -> Iterator[bytes]:
    """A generator body: httpx sends it with ``Transfer-Encoding: chunked`` and no Content-Length."""
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


@dataclass
class Case:
    id: str
    body: bytes | dict[str, Any] | list[Any] | Callable[[], Any]
    status: int
    param: str | None | type[Ellipsis] = ...  # ... = not checked
    param_prefix: str | None = None
    code: str | None | type[Ellipsis] = ...
    mentions: tuple[str, ...] = ()  # words a helpful message contains (case-insensitive)
    gateway: str = "default"  # or "small_body": max_body_bytes=10_000
    headers: dict[str, str] = field(default_factory=dict)

    def content(self) -> bytes | Iterator[bytes]:
        body = self.body() if callable(self.body) else self.body
        if isinstance(body, (bytes, Iterator)):
            return body
        return json.dumps(body).encode()


ORPHAN_TOOL_MESSAGES = [USER, {"role": "tool", "tool_call_id": "call_nowhere", "content": "18C"}]
ANSWERED_TOOL_CALL = [
    USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        ],
    },
]
OVERSIZED = json.dumps(chat(messages=[{"role": "user", "content": "x" * 20_000}])).encode()

CASES = [
    Case("malformed-json", b'{"model": "tiny", "messages": [', 400, param=None, mentions=("json",)),
    Case("malformed-json-trailing-comma", b'{"model": "tiny", "messages": [],}', 400, param=None,
         mentions=("json",)),
    Case("json-list", [chat()], 400, mentions=("object",)),
    Case("json-number", b"42", 400, mentions=("object",)),
    Case("json-string", b'"hello"', 400, mentions=("object",)),
    Case("messages-is-a-string", chat(messages="Say hi."), 400, param="messages", mentions=("messages",)),
    Case("temperature-is-a-string", chat(temperature="hot"), 400, param="temperature",
         mentions=("temperature",)),
    Case("temperature-too-high", chat(temperature=3.5), 400, param="temperature", mentions=("temperature",)),
    Case("max-tokens-negative", chat(max_tokens=-5), 400, param="max_tokens", mentions=("max_tokens",)),
    Case("max-tokens-float", chat(max_tokens=2.5), 400, param="max_tokens", mentions=("max_tokens",)),
    Case("n-zero", chat(n=0), 400, param="n", mentions=("n",)),
    Case("missing-messages", chat(messages=None), 400, param="messages", mentions=("messages",)),
    Case("missing-model", chat(model=None), 400, param="model", mentions=("model",)),
    Case("model-not-a-string", chat(model=7), 400, param="model", mentions=("model",)),
    Case("empty-messages", chat(messages=[]), 400, param="messages", mentions=("messages",)),
    Case("unknown-role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, param_prefix="messages",
         mentions=("role",)),
    Case("message-not-an-object", chat(messages=["hi"]), 400, param_prefix="messages"),
    Case("image-url-part",
         chat(messages=[{"role": "user", "content": [
             {"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
         ]}]),
         400, param_prefix="messages", mentions=("image_url",)),
    Case("user-without-content", chat(messages=[{"role": "user"}]), 400, param_prefix="messages",
         mentions=("content",)),
    Case("unknown-model", chat(model="gpt-nonexistent"), 404, param="model", code="model_not_found",
         mentions=("gpt-nonexistent",)),
    Case("tool-parameters-invalid-schema",
         chat(tools=[{"type": "function",
                      "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]),
         400, param_prefix="tools", mentions=("schema",)),
    Case("tool-parameters-schema-keyword-not-a-string",
         chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"$schema": []}}}]),
         400, param_prefix="tools", mentions=("schema",)),
    Case("tool-name-invalid", chat(tools=[{"type": "function", "function": {"name": "has spaces"}}]),
         400, param_prefix="tools"),
    Case("tool-names-duplicate", chat(tools=[GET_WEATHER, GET_WEATHER]), 400, param="tools",
         mentions=("unique",)),
    Case("tool-choice-unknown-function",
         chat(tools=[GET_WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}),
         400, param="tool_choice", mentions=("get_time",)),
    Case("tool-choice-required-without-tools", chat(tool_choice="required"), 400, param="tool_choice",
         mentions=("tool",)),
    Case("tool-message-orphan-tool-call-id", chat(messages=ORPHAN_TOOL_MESSAGES), 400,
         param_prefix="messages", mentions=("call_nowhere",)),
    Case("tool-message-without-tool-call-id",
         chat(messages=[*ANSWERED_TOOL_CALL, {"role": "tool", "content": "18C"}]), 400,
         param_prefix="messages", mentions=("tool_call_id",)),
    Case("tool-calls-on-user-message",
         chat(messages=[{**USER, "tool_calls": ANSWERED_TOOL_CALL[1]["tool_calls"]}]), 400,
         param_prefix="messages", mentions=("tool_calls",)),
    Case("top-logprobs-without-logprobs", chat(top_logprobs=3), 400, param="top_logprobs",
         mentions=("logprobs",)),
    Case("empty-stop-string", chat(stop=""), 400, param="stop", mentions=("stop",)),
    Case("invalid-utf8-in-string",
         b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}', 400,
         param=None),
    Case("invalid-utf8-outside-strings", b'{"model": "tiny", \xc3\x28 "messages": []}', 400, param=None),
    Case("invalid-session-header", chat(), 400, param="session", mentions=("session",),
         headers={"x-arborl-session": "has spaces/and slashes"}),
    Case("body-over-limit", OVERSIZED, 413, code="request_too_large", mentions=(str(SMALL_BODY_LIMIT),),
         gateway="small_body"),
    Case("body-over-limit-chunked", lambda: chunked(OVERSIZED), 413, code="request_too_large",
         mentions=(str(SMALL_BODY_LIMIT),), gateway="small_body"),
    Case("prompt-over-context", chat(messages=[{"role": "user", "content": long_prompt()}]), 400,
         param="messages", code="context_length_exceeded", mentions=("4096",)),
]

ACCEPTED = [
    Case("unknown-top-level-fields", chat(frobnicate={"a": [1, 2]}, user="u-1", service_tier="auto"), 200),
    Case("unknown-message-fields",
         chat(messages=[{"role": "system", "content": "Be brief.", "cache_control": {"type": "ephemeral"}},
                        {"role": "user", "content": [{"type": "text", "text": "hi", "annotations": []}],
                         "weight": 0.5}]),
         200),
    Case("unknown-nested-fields",
         chat(tools=[{**GET_WEATHER, "x-extra": True}], stream_options=None, tool_choice="auto",
              metadata={"anything": "goes"}),
         200),
]


@pytest.fixture(scope="module")
def gateways(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LiveGateway]]:
    """One gateway with default settings and one refusing bodies over 10 kB, shared by the table."""
    started: dict[str, LiveGateway] = {}
    servers = []
    try:
        for name, settings in (("default", {}), ("small_body", {"max_body_bytes": SMALL_BODY_LIMIT})):
            server, live = start_gateway(tiny_model_dir, tmp_path_factory.mktemp(name), **settings)
            live.url = server.__enter__()
            servers.append((server, live))
            started[name] = live
        yield started
    finally:
        for server, live in reversed(servers):
            server.__exit__(None, None, None)
            live.store.close()


def post(
    live: LiveGateway, content: bytes | Iterator[bytes], headers: dict[str, str] | None = None
) -> httpx.Response:
    SENT[live.url] += 1
    return httpx.post(
        live.v1 + "/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
    )


def assert_openai_error(response: httpx.Response) -> dict[str, Any]:
    """The body is exactly ``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_in_openai_format(gateways: dict[str, LiveGateway], case: Case):
    response = post(gateways[case.gateway], case.content(), case.headers)
    assert response.status_code == case.status, (response.status_code, response.text[:500])
    error = assert_openai_error(response)
    if case.status == 400:
        assert error["type"] == "invalid_request_error", error
    if case.param is not ...:
        assert error["param"] == case.param, error
    if case.param_prefix is not None:
        assert (error["param"] or "").startswith(case.param_prefix), error
    if case.code is not ...:
        assert error["code"] == case.code, error
    for word in case.mentions:
        assert word.lower() in error["message"].lower(), (word, error)
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_unknown_fields_are_accepted(gateways: dict[str, LiveGateway], case: Case):
    response = post(gateways[case.gateway], case.content(), case.headers)
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_gateway_is_healthy_after_the_table(gateways: dict[str, LiveGateway]):
    """Runs after the table (file order): nothing got stuck, and no request was answered with a 5xx."""
    for name, live in gateways.items():
        response = post(live, json.dumps(chat(max_tokens=4)).encode())
        assert response.status_code == 200, (name, response.text[:500])
        assert response.json()["usage"]["completion_tokens"] >= 1
        deadline = time.time() + 10
        while live.engine.stats().running or live.engine.stats().waiting:
            assert time.time() < deadline, (name, live.engine.stats())
            time.sleep(0.05)
        metrics = live.metrics()
        requests = {key: value for key, value in metrics.items() if key.startswith("arborl_requests_total{")}
        assert requests, f"{name}: arborl_requests_total missing from /metrics"
        server_errors = {key: value for key, value in requests.items() if "status=5" in key and value}
        assert not server_errors, (name, server_errors)
    # A 5xx is only visible in /metrics if every request is counted: on the gateway whose requests all
    # reach routing (no 413s), the chat route's counts add up to what this module sent it.
    live = gateways["default"]
    counted = sum(
        value for key, value in live.metrics().items()
        if key.startswith("arborl_requests_total{") and f"route={CHAT_ROUTE}," in key
    )
    assert counted == SENT[live.url], (
        f"{SENT[live.url]} requests sent, {counted} counted in arborl_requests_total:"
        " an answer (a 500 from an unhandled exception, say) escaped the metrics"
    )


# -- extreme but well-typed values: a 4xx or an answer, never a 5xx or a dead engine ----------------------


EXTREMES = [
    pytest.param({"temperature": 1e-300}, id="temperature-1e-300"),
    pytest.param({"temperature": 5e-324}, id="temperature-smallest-subnormal"),
    pytest.param({"top_p": 1e-300}, id="top-p-1e-300"),
    pytest.param({"top_p": 5e-324, "temperature": 2.0}, id="top-p-smallest-subnormal"),
    pytest.param({"seed": 2**64}, id="seed-above-uint64"),
    pytest.param({"seed": -(2**63) - 1}, id="seed-below-int64"),
    pytest.param({"top_k": 10**20, "stop_token_ids": [10**20]}, id="huge-top-k-and-stop-token-id"),
    pytest.param({"messages": [{"role": "user", "content": "a\ud800b"}]}, id="lone-surrogate-in-content"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fields", EXTREMES)
def test_extreme_values_get_an_answer_or_a_4xx(gateway: LiveGateway, fields: dict[str, Any], stream: bool):
    """Either a 4xx in OpenAI's format before anything is generated, or a complete answer; then the engine
    still serves the next request. (A 200 stream that dies midway, or an engine killed for everyone, is
    the bug.)"""
    body = json.dumps(chat(max_tokens=3, stream=stream, **fields)).encode()
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", gateway.v1 + "/chat/completions", content=body,
                         headers={"content-type": "application/json"}) as response:
            response.read()
        if response.status_code != 200:
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
            assert_openai_error(response)
        elif stream:
            events = [line.removeprefix("data: ") for line in response.text.splitlines()
                      if line.startswith("data: ")]
            # An in-band error event here is the streaming form of a 5xx: the input was known before the 200.
            assert events and events[-1] == "[DONE]", f"stream ended without [DONE]: {response.text[-500:]!r}"
            chunks = [json.loads(event) for event in events[:-1]]
            finishes = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]
                        if choice["finish_reason"]]
            assert finishes, response.text[-500:]
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
        after = http.post(gateway.v1 + "/chat/completions", json=chat(max_tokens=2))
    assert after.status_code == 200, f"the next request failed: {after.status_code} {after.text[:300]}"
    assert gateway.engine.healthy


# -- the official SDK sees the refusals as typed exceptions --------------------------------------------


@pytest.fixture(scope="module")
def client(gateways: dict[str, LiveGateway]) -> Iterator[openai.OpenAI]:
    live = gateways["default"]

    def count(request: httpx.Request) -> None:
        SENT[live.url] += 1

    http = httpx.Client(timeout=60, event_hooks={"request": [count]})
    with openai.OpenAI(base_url=live.v1, api_key="sk-test", max_retries=0, http_client=http) as sdk:
        yield sdk


def test_sdk_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[USER], max_tokens=2, tool_choice="required")
    assert info.value.status_code == 400
    assert info.value.param == "tool_choice"
    assert "tool_choice requires tools" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"


def test_sdk_raises_bad_request_for_context_length(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt()}])
    assert info.value.code == "context_length_exceeded"
    assert "4096" in info.value.message


def test_sdk_raises_not_found_for_unknown_model(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nonexistent", messages=[USER], max_tokens=2)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "gpt-nonexistent" in info.value.message


def test_sdk_streaming_refusal_raises_before_any_chunk(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2, stream=True)
    assert info.value.param == "messages"


# -- a client that hangs up mid-stream -------------------------------------------------------------------


def test_client_disconnect_mid_stream_cancels_the_call(gateway: LiveGateway):
    max_tokens = 2000
    request = chat(max_tokens=max_tokens, ignore_eos=True, stream=True, temperature=1.0)
    data_lines = 0
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", gateway.v1 + "/chat/completions", json=request) as response,
    ):
        assert response.status_code == 200
        session_id = response.headers["x-arborl-session"]
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", "the whole completion arrived before the client hung up"
                data_lines += 1
                if data_lines >= 3:  # the role chunk and two tokens
                    break
        # leaving the block closes the response (and the connection) mid-stream
    assert data_lines >= 3

    deadline = time.time() + 30
    calls = []
    while time.time() < deadline:
        calls = gateway.store.calls(session_id)
        if calls:
            break
        time.sleep(0.05)
    assert len(calls) == 1, calls
    call = calls[0]
    assert call.status == "cancelled", call
    assert call.finish_reason == "abort"
    assert 1 <= call.completion_len < max_tokens, call.completion_len
    assert call.finished_at is not None

    deadline = time.time() + 10
    while gateway.engine.stats().running or gateway.engine.stats().waiting:
        assert time.time() < deadline, gateway.engine.stats()
        time.sleep(0.05)

    response = httpx.post(gateway.v1 + "/chat/completions", json=chat(max_tokens=3), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert gateway.engine.stats().running == 0
    statuses = [c.status for c in gateway.store.calls(session_id)]
    assert statuses == ["cancelled", "ok"], statuses


def test_client_disconnect_during_non_streaming_request_cancels_the_call(gateway: LiveGateway):
    max_tokens = 2000
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/s/gone-1/v1/chat/completions", json=chat(max_tokens=max_tokens, ignore_eos=True),
                   timeout=httpx.Timeout(60, read=1.5))
    deadline = time.time() + 30
    while not gateway.store.calls("gone-1"):
        assert time.time() < deadline, "the abandoned call was never recorded"
        time.sleep(0.05)
    (call,) = gateway.store.calls("gone-1")
    assert call.status == "cancelled" and 1 <= call.completion_len < max_tokens
    deadline = time.time() + 10
    while gateway.engine.stats().running:
        assert time.time() < deadline, gateway.engine.stats()
        time.sleep(0.05)
