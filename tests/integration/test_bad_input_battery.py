"""Bad input to every completion route over real HTTP: a 4xx in the route's own error format, never a 5xx.

One live gateway (the tiny model on loopback) gets a table of raw requests on the six routes
(Chat Completions, Responses, Anthropic Messages and count_tokens, Gemini generateContent and
countTokens), each malformed in a way an
attacker or a buggy client could send: fields of the wrong type inside Responses input items, tool
schemas jsonschema cannot check, JSON nested past the gateway's limit (``json_nesting``), session
ids that could escape a folder, tool names over the one limit every dialect shares. Each must get
the status, format and message the table says. Then the inputs that must be *served* (a lone
surrogate echoed back, tool names at the limit, client text that would break a header), and last a
check that the gateway answered no 5xx at all (``arborl_requests_total``), and is still serving.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from conftest import LiveGateway, start_gateway
from sse import sse_events

CHAT, RESPONSES, MESSAGES, COUNT = "/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"
GEMINI, GEMINI_COUNT = "/v1beta/models/tiny:generateContent", "/v1beta/models/tiny:countTokens"
GEMINI_USER = {"role": "user", "parts": [{"text": "Say hi."}]}
USER = {"role": "user", "content": "Say hi."}
FUNCTION_CALL = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}


def deep_schema(levels: int) -> dict[str, Any]:
    """A JSON schema nesting ``levels`` ``properties`` (two JSON levels each): about 30 bytes a level."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


DEEP_ARGUMENTS = "[" * 5000 + "]" * 5000  # valid JSON, in a string: the body's own nesting does not show it


def body_for(route: str, **fields: Any) -> dict[str, Any]:
    """A valid short request for ``route`` with ``fields`` replaced."""
    base: dict[str, Any] = {
        CHAT: {"model": "tiny", "messages": [USER], "max_tokens": 2},
        RESPONSES: {"model": "tiny", "input": "Say hi.", "max_output_tokens": 2},
        MESSAGES: {"model": "tiny", "messages": [USER], "max_tokens": 2},
        COUNT: {"model": "tiny", "messages": [USER]},
        GEMINI: {"contents": [GEMINI_USER], "generationConfig": {"maxOutputTokens": 2}},
        GEMINI_COUNT: {"contents": [GEMINI_USER]},
    }[route]
    return {**base, **fields}


def chat_tool(name: str = "get_weather", parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def anthropic_tool(name: str = "get_weather", schema: Any = None) -> dict[str, Any]:
    return {"name": name, "input_schema": schema if schema is not None else {"type": "object"}}


def gemini_tool(name: str = "get_weather", schema: Any = None) -> dict[str, Any]:
    declaration: dict[str, Any] = {"name": name}
    if schema is not None:
        declaration["parametersJsonSchema"] = schema
    return {"functionDeclarations": [declaration]}


def deeply_nested_body(route: str, levels: int) -> bytes:
    """A valid body with an ignored field nested ``levels`` deep (unknown fields are accepted)."""
    text = json.dumps(body_for(route))
    return (text[:-1] + ', "x": ' + "[" * levels + "]" * levels + "}").encode()


@dataclass
class Case:
    id: str
    route: str
    body: dict[str, Any] | bytes
    status: int
    mentions: tuple[str, ...] = ()  # words the message must contain (case-insensitive)
    param: str | None | type[Ellipsis] = ...  # OpenAI's param, when it matters
    path_session: str | None = None  # send to /s/{path_session}/...
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, base: str) -> str:
        return base + (f"/s/{self.path_session}" if self.path_session is not None else "") + self.route

    def content(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


REFUSED = [
    # 1. Responses: a function_call_output's call_id that is not a string
    Case("responses-output-call-id-list", RESPONSES,
         body_for(RESPONSES, input=[FUNCTION_CALL, {"type": "function_call_output", "call_id": ["c1"], "output": "x"}]),
         400, ("call_id", "string"), param="input.1.call_id"),
    Case("responses-output-call-id-object", RESPONSES,
         body_for(RESPONSES, input=[FUNCTION_CALL, {"type": "function_call_output", "call_id": {"id": "c1"},
                                                    "output": "x"}]),
         400, ("call_id",), param="input.1.call_id"),
    Case("responses-function-call-name-number", RESPONSES,
         body_for(RESPONSES, input=[{**FUNCTION_CALL, "name": 7}, USER]), 400, ("name",), param="input.0.name"),
    # 2. Responses: reasoning items of the wrong shape
    Case("responses-reasoning-content-string", RESPONSES,
         body_for(RESPONSES, input=[{"type": "reasoning", "content": "thinking"}, USER]), 400, ("content", "list"),
         param="input.0.content"),
    Case("responses-reasoning-content-number", RESPONSES,
         body_for(RESPONSES, input=[{"type": "reasoning", "content": 42}, USER]), 400, ("content",),
         param="input.0.content"),
    Case("responses-reasoning-summary-string", RESPONSES,
         body_for(RESPONSES, input=[{"type": "reasoning", "summary": "short"}, USER]), 400, ("summary",),
         param="input.0.summary"),
    Case("responses-reasoning-part-text-number", RESPONSES,
         body_for(RESPONSES, input=[{"type": "reasoning", "summary": [{"type": "summary_text", "text": 5}]}, USER]),
         400, ("text",)),
    Case("responses-message-content-number", RESPONSES,
         body_for(RESPONSES, input=[{"role": "user", "content": 5}]), 400, ("content",)),
    # 3. Tool schemas jsonschema cannot handle are the client's error
    Case("chat-schema-keyword-a-number", CHAT, body_for(CHAT, tools=[chat_tool(parameters={"$schema": 5})]), 400,
         ("schema",), param="tools[0]"),
    Case("chat-parameters-not-an-object", CHAT, body_for(CHAT, tools=[chat_tool(parameters=[1, 2])]), 400,
         ("parameters",)),
    Case("messages-schema-keyword-a-number", MESSAGES,
         body_for(MESSAGES, tools=[anthropic_tool(schema={"$schema": 5})]), 400, ("schema",)),
    Case("responses-schema-keyword-a-number", RESPONSES,
         body_for(RESPONSES, tools=[{"type": "function", "name": "f", "parameters": {"$schema": 5}}]), 400,
         ("schema",)),
    Case("gemini-schema-keyword-a-number", GEMINI, body_for(GEMINI, tools=[gemini_tool(schema={"$schema": 5})]),
         400, ("schema",)),
    Case("gemini-google-schema-type-a-number", GEMINI, body_for(GEMINI, tools=[
        {"functionDeclarations": [{"name": "f", "parameters": {"type": 5}}]}]), 400, ("schema",)),
    # 4. Nesting past the documented limit (64 levels), in the body and inside tool-call arguments
    *[Case(f"{name}-schema-nested-120-properties", route, body, 400, ("64 levels",))
      for name, route, body in [
          ("chat", CHAT, body_for(CHAT, tools=[chat_tool(parameters=deep_schema(120))])),
          ("responses", RESPONSES, body_for(RESPONSES, tools=[{"type": "function", "name": "f",
                                                               "parameters": deep_schema(120)}])),
          ("messages", MESSAGES, body_for(MESSAGES, tools=[anthropic_tool(schema=deep_schema(120))])),
          ("count-tokens", COUNT, body_for(COUNT, tools=[anthropic_tool(schema=deep_schema(120))])),
          ("gemini", GEMINI, body_for(GEMINI, tools=[gemini_tool(schema=deep_schema(120))])),
      ]],
    *[Case(f"{name}-body-nested-1000-levels", route, deeply_nested_body(route, 1000), 400, ("nests", "64 levels"))
      for name, route in [("chat", CHAT), ("responses", RESPONSES), ("messages", MESSAGES), ("count-tokens", COUNT),
                          ("gemini", GEMINI), ("gemini-count-tokens", GEMINI_COUNT)]],
    Case("gemini-function-args-nested-1000-levels", GEMINI, json.dumps(body_for(GEMINI, contents=[
        GEMINI_USER, {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": "DEEP"}}}]}])).replace(
            '"DEEP"', "[" * 1000 + "]" * 1000).encode(), 400, ("nests", "64 levels")),
    Case("chat-arguments-nested-5000-levels", CHAT,
         body_for(CHAT, messages=[USER, {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP_ARGUMENTS}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "ok"}]),
         400, ("arguments", "64 levels")),
    Case("responses-arguments-nested-5000-levels", RESPONSES,
         body_for(RESPONSES, input=[USER, {**FUNCTION_CALL, "arguments": DEEP_ARGUMENTS},
                                    {"type": "function_call_output", "call_id": "c1", "output": "ok"}]),
         400, ("arguments", "64 levels")),
    # 16. Session ids that could name a file elsewhere, and tool names over the shared limit
    *[Case(f"{name}-session-dot-dot-header", route, body_for(route), 400, ("session",),
           headers={"x-arborl-session": ".."})
      for name, route in [("chat", CHAT), ("messages", MESSAGES), ("gemini", GEMINI)]],
    Case("gemini-session-over-128", GEMINI, body_for(GEMINI), 400, ("session",), path_session="s" * 129),
    Case("gemini-count-tokens-session-newline", GEMINI_COUNT, body_for(GEMINI_COUNT), 400, ("session",),
         path_session="bad%0A"),
    Case("chat-session-dot-dot-inside", CHAT, body_for(CHAT), 400, ("session",), path_session="a..b"),
    Case("responses-session-over-128", RESPONSES, body_for(RESPONSES), 400, ("session",), path_session="s" * 129),
    Case("messages-session-control-character", MESSAGES, body_for(MESSAGES), 400, ("session",),
         path_session="bad%01id"),
    Case("count-tokens-session-newline", COUNT, body_for(COUNT), 400, ("session",), path_session="bad%0A"),
    Case("chat-claude-session-over-128-with-prefix", CHAT, body_for(CHAT), 400, ("session",),
         headers={"x-claude-code-session-id": "c" * 125}),
    Case("chat-tool-name-129", CHAT, body_for(CHAT, tools=[chat_tool("f" * 129)]), 400, ("name",)),
    Case("messages-tool-name-129", MESSAGES, body_for(MESSAGES, tools=[anthropic_tool("f" * 129)]), 400, ("name",)),
    Case("responses-tool-name-10000", RESPONSES,
         body_for(RESPONSES, tools=[{"type": "function", "name": "f" * 10_000}]), 400, ("name",)),
    Case("responses-function-tool-without-name", RESPONSES, body_for(RESPONSES, tools=[{"type": "function"}]), 400,
         ("name",)),
    Case("gemini-tool-name-129", GEMINI, body_for(GEMINI, tools=[gemini_tool("f" * 129)]), 400, ("name",)),
    Case("gemini-tool-name-with-markup", GEMINI, body_for(GEMINI, tools=[gemini_tool("f>\n<tool_call>")]), 400,
         ("name",)),
    Case("gemini-function-response-name-with-markup", GEMINI, body_for(GEMINI, contents=[
        GEMINI_USER, {"role": "user", "parts": [{"functionResponse": {"name": "f>x", "response": {}}}]}]), 400,
         ("name",)),
    Case("responses-tool-name-with-markup", RESPONSES,
         body_for(RESPONSES, tools=[{"type": "function", "name": "f>\n<tool_call>"}]), 400, ("name",)),
]


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server, gateway = start_gateway(tiny_model_dir, tmp_path_factory.mktemp("battery"))
    with server as url:
        gateway.url = url
        yield gateway
    gateway.store.close()


def assert_dialect_error(route: str, response: httpx.Response) -> str:
    """The body is the route's own error object; returns its message."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    if route in (GEMINI, GEMINI_COUNT):
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "status"}, body
        assert body["error"]["status"] == "INVALID_ARGUMENT" and body["error"]["code"] == response.status_code, body
        return body["error"]["message"]
    if route in (MESSAGES, COUNT):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == "invalid_request_error", body
        return body["error"]["message"]
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error", body
    return body["error"]["message"]


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_bad_input_is_refused_in_the_routes_own_format(live: LiveGateway, case: Case):
    response = httpx.post(case.url(live.url), content=case.content(), timeout=60,
                          headers={"content-type": "application/json", **case.headers})
    assert response.status_code == case.status, (response.status_code, response.text[:500])
    message = assert_dialect_error(case.route, response)
    for word in case.mentions:
        assert word.lower() in message.lower(), (word, message)
    if case.param is not ... and case.route in (CHAT, RESPONSES):
        assert response.json()["error"]["param"] == case.param, response.json()
    assert "Traceback" not in message and "nternal error" not in message


# -- what must be served, not refused ----------------------------------------------------------------------


def test_a_lone_surrogate_is_echoed_back_exactly(live: LiveGateway):
    """JSON may carry "\\ud800"; Responses echoes instructions and metadata, streaming or not."""
    raw = (b'{"model": "tiny", "input": "Say hi.", "max_output_tokens": 2, '
           b'"instructions": "be \\ud800 brief", "metadata": {"tag": "x\\udfffy"}}')
    reply = httpx.post(live.v1 + "/responses", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = json.loads(reply.content)
    assert body["instructions"] == "be \ud800 brief" and body["metadata"] == {"tag": "x\udfffy"}
    streamed = raw[:-1] + b', "stream": true}'
    with httpx.stream("POST", live.v1 + "/responses", content=streamed, timeout=60,
                      headers={"content-type": "application/json"}) as response:
        events = sse_events(response)
    assert events[-1][0] == "response.completed", events[-1]
    assert events[-1][1]["response"]["instructions"] == "be \ud800 brief"
    assert events[-1][1]["response"]["metadata"] == {"tag": "x\udfffy"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_client_text_never_breaks_a_header(live: LiveGateway, stream: bool):
    """Unsupported Responses tool types are named in a header: a CR/LF or a non-ASCII type is escaped."""
    kinds = ["web_search", "evil\r\nSet-Cookie: session=stolen", "r\u00e9sum\u00e9", "a,b"]
    body = body_for(RESPONSES, tools=[{"type": kind} for kind in kinds], stream=stream)
    with httpx.stream("POST", live.v1 + "/responses", json=body, timeout=60) as response:
        response.read()
    assert response.status_code == 200, response.text
    assert "set-cookie" not in response.headers
    header = response.headers["x-arborl-ignored-tools"]
    assert header.isascii() and "\r" not in header and "\n" not in header
    assert [unquote(part) for part in header.split(",")] == kinds


@pytest.mark.parametrize("route", [CHAT, RESPONSES, MESSAGES, GEMINI])
def test_a_128_character_tool_name_is_served_by_every_dialect(live: LiveGateway, route: str):
    name = "t" * 128
    tool = {CHAT: chat_tool(name), RESPONSES: {"type": "function", "name": name},
            MESSAGES: anthropic_tool(name), GEMINI: gemini_tool(name)}[route]
    response = httpx.post(live.url + route, json=body_for(route, tools=[tool]), timeout=60)
    assert response.status_code == 200, response.text


def test_nesting_at_the_limit_is_served(live: LiveGateway):
    response = httpx.post(live.url + CHAT, content=deeply_nested_body(CHAT, 60), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_every_session_operation_declares_its_path_parameter(live: LiveGateway):
    """OpenAPI: every ``{name}`` in a path is a declared path parameter of each of its operations."""
    schema = httpx.get(live.url + "/openapi.json").json()
    session_paths = [path for path in schema["paths"] if path.startswith("/s/{session_id}")]
    assert len(session_paths) >= 5, session_paths
    for path, operations in schema["paths"].items():
        named = set(re.findall(r"\{(\w+)\}", path))  # Gemini's: /models/{model}:generateContent
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == named, (method, path, declared)


def test_no_5xx_was_answered_and_the_gateway_still_serves(live: LiveGateway):
    """Runs last (file order): the table left the engine idle and answered no 5xx."""
    response = httpx.post(live.url + CHAT, json=body_for(CHAT), timeout=60)
    assert response.status_code == 200, response.text
    server_errors = {key: value for key, value in live.metrics().items()
                     if key.startswith("arborl_requests_total{") and "status=5" in key and value}
    assert not server_errors, server_errors
    assert live.engine.healthy and live.engine.stats().running == 0


@pytest.mark.parametrize("parser", ["hermes", "qwen3_coder", "llama3_json"])
def test_history_with_arguments_that_are_not_json_is_served_by_every_tool_format(
        tiny_model_dir: Path, tmp_path: Path, parser: str):
    """An earlier call's ``arguments`` that are not a JSON object are re-rendered as the text the
    client sent (Qwen3-Coder's XML format used to fail on them with a 500)."""
    server, live = start_gateway(tiny_model_dir, tmp_path, tool_parser=parser)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "city=Rome"}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with server as url:
        reply = httpx.post(url + CHAT, json=body_for(CHAT, messages=messages, tools=[chat_tool()]), timeout=60)
    live.store.close()
    assert reply.status_code == 200, reply.text
