"""The official anthropic SDK against /v1/messages on a live gateway, and the SSE event order."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from sse import sse_events
from tool_caller import CALL_ARGUMENTS, TOOL_RESULT

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _client(live, session: str | None = None) -> anthropic.Anthropic:
    base = live.url + (f"/s/{session}" if session else "")
    return anthropic.Anthropic(base_url=base, api_key="test", max_retries=0)


def test_non_streaming_text(gateway):
    message = _client(gateway).messages.create(
        model="tiny", max_tokens=12,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        metadata={"user_id": "u1"}, extra_body={"context_management": {"edits": []}},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    (call,) = gateway.store.calls(gateway.store.sessions()[0]["id"])
    assert call.dialect == "anthropic_messages" and call.completion_len == message.usage.output_tokens


def test_tool_use_loop_is_one_path(tool_gateway):
    client = _client(tool_gateway, "claude-loop")
    messages: list[dict] = list(ASK)
    for _ in range(4):
        reply = client.messages.create(model="tiny", max_tokens=60, tools=[WEATHER], messages=messages,
                                       extra_body={"temperature": 0})
        assert reply.stop_reason == "tool_use"
        (use,) = [b for b in reply.content if b.type == "tool_use"]
        assert use.name == "get_weather" and use.input == CALL_ARGUMENTS
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": TOOL_RESULT}]})
    calls = tool_gateway.store.calls("claude-loop")
    assert [c.branch_reason for c in calls] == [None] * 4
    assert all(c.stitched_from for c in calls[1:])
    trie = tool_gateway.store.trie("claude-loop")
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len


def test_streaming_tool_use_with_the_sdk(tool_gateway):
    client = _client(tool_gateway)
    with client.messages.stream(model="tiny", max_tokens=60, tools=[WEATHER], messages=ASK,
                                 extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.input == CALL_ARGUMENTS
    assert final.stop_reason == "tool_use"


def test_stream_event_order_conforms(tool_gateway):
    """message_start, ping, then whole content blocks, message_delta, message_stop: nothing else."""
    body = {"model": "tiny", "max_tokens": 60, "temperature": 0, "tools": [WEATHER], "messages": ASK, "stream": True}
    with httpx.stream("POST", tool_gateway.url + "/v1/messages?beta=true", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and events[1][0] == "ping"
    assert names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert set(start["usage"]) >= {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens"}
    blocks, open_index = [], None
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None
            open_index = data["index"]
            assert open_index == len(blocks)
            blocks.append(data["content_block"])
        elif name == "content_block_delta":
            assert data["index"] == open_index
            assert data["delta"]["type"] in ("text_delta", "input_json_delta", "thinking_delta")
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            assert name == "ping"
    assert open_index is None
    assert blocks[-1]["type"] == "tool_use" and blocks[-1]["name"] == "get_weather" and blocks[-1]["input"] == {}
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 0


def test_count_tokens_matches_the_prompt(gateway):
    client = _client(gateway, "count")
    counted = client.messages.count_tokens(model="tiny", messages=ASK, system="You are terse.")
    message = client.messages.create(model="tiny", max_tokens=2, messages=ASK, system="You are terse.")
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_system_mid_conversation_and_tool_error_results(gateway):
    messages = [
        {"role": "user", "content": "Run it."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should run it.", "signature": "x"},
            {"type": "tool_use", "id": "toolu_1", "name": "run", "input": {"cmd": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": [{"type": "text", "text": "permission denied"}]}]},
        {"role": "system", "content": "Reminder: be careful."},
        {"role": "user", "content": "Try again."},
    ]
    tools = [{"name": "run", "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
             {"type": "web_search_20250305", "name": "web_search"}]
    reply = _client(gateway).messages.create(
        model="tiny", max_tokens=4, messages=messages, tools=tools, tool_choice={"type": "auto"},
        thinking={"type": "enabled", "budget_tokens": 1024}, stop_sequences=["\n\n"],
    )
    assert reply.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
    (call,) = gateway.store.calls(gateway.store.sessions()[0]["id"])
    assert call.messages[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: permission denied"}
    assert call.messages[3] == {"role": "system", "content": "Reminder: be careful."}


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"model": "tiny", "max_tokens": 5}, 400, "invalid_request_error", "messages"),
        ({"model": "tiny", "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
        ({"model": "claude-nope", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "claude-nope"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
         400, "invalid_request_error", "image"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}]}]}, 400, "invalid_request_error",
         "toolu_x"),
        ({"model": "tiny", "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "tool", "name": "nope"},
          "tools": [WEATHER]}, 400, "invalid_request_error", "nope"),
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 6000}]},
         400, "invalid_request_error", "prompt is too long"),
    ],
    ids=["no-messages", "no-max-tokens", "unknown-model", "image", "orphan-tool-result", "unknown-tool-choice",
         "too-long"],
)
def test_errors_in_anthropic_format(gateway, body, status, error_type, words):
    response = httpx.post(gateway.url + "/v1/messages", json=body, timeout=60)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == error_type
    assert words in payload["error"]["message"]


def test_sdk_raises_typed_errors(gateway):
    client = _client(gateway)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-nope", max_tokens=5, messages=ASK)
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "word " * 6000}])
    malformed = httpx.post(gateway.url + "/v1/messages", content=b'{"model": ',
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["type"] == "error"


@pytest.mark.parametrize(("reply", "kinds"), [
    ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     ["text", "tool_use"]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\nThen I will report.',
     ["tool_use", "text"]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\nBoth asked.',
     ["tool_use", "tool_use", "text"]),
], ids=["text-then-call", "call-then-text", "calls-whitespace-text"])
def test_streamed_and_json_answers_hold_the_same_blocks_in_the_same_order(tiny_model_dir, tmp_path, reply, kinds):
    """The same output gives the same content blocks, streamed or not, in the order generated
    (no text block of whitespace alone between two calls)."""
    from transformers import AutoTokenizer

    from arborl.gateway.app import create_app
    from arborl.gateway.settings import GatewaySettings
    from arborl.ops.local_gateway import ServerThread
    from arborl.rollout.store import SqliteTrajectoryStore
    from scripted_engine import ScriptedEngine

    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model_dir), lambda prompt: reply)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    body = {"model": "tiny", "max_tokens": 200, "tools": [WEATHER], "messages": ASK}
    with ServerThread(create_app(engine, store, GatewaySettings(tool_parser="hermes"))) as url:
        whole = httpx.post(url + "/v1/messages", json=body, timeout=30).json()["content"]
        with httpx.stream("POST", url + "/v1/messages", json={**body, "stream": True}, timeout=30) as response:
            events = sse_events(response)
    streamed: list[dict] = []
    arguments = ""
    for name, data in events:
        if name == "content_block_start":
            streamed.append(dict(data["content_block"]))
            arguments = ""
        elif name == "content_block_delta" and data["delta"]["type"] == "text_delta":
            streamed[-1]["text"] += data["delta"]["text"]
        elif name == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
            arguments += data["delta"]["partial_json"]
        elif name == "content_block_stop" and streamed[-1]["type"] == "tool_use":
            streamed[-1]["input"] = json.loads(arguments)

    def without_ids(blocks: list[dict]) -> list[dict]:  # each answer's tool calls get ids of their own
        return [{k: v for k, v in block.items() if k != "id"} for block in blocks]

    assert without_ids(streamed) == without_ids(whole)
    assert [block["type"] for block in whole] == kinds
    assert all(block["text"].strip() for block in whole if block["type"] == "text")
    store.close()
