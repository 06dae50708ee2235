"""The openai SDK's Responses API against a live gateway, Codex-style tool loops, event order."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.gateway.tool_parsers import get_parser
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import ServerThread
from scripted_engine import ScriptedEngine
from sse import sse_events
from tool_caller import CALL_ARGUMENTS, TOOL_RESULT

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ASK = [{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]


def test_text_response(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    response = client.responses.create(model="tiny", input="Say hi", instructions="Be brief.", max_output_tokens=8,
                                       store=False)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output_text == response.output[0].content[0].text
    assert response.usage.output_tokens > 0
    (call,) = gateway.store.calls(gateway.store.sessions()[0]["id"])
    assert call.dialect == "openai_responses" and call.messages[0] == {"role": "system", "content": "Be brief."}


def test_codex_style_tool_loop_is_one_path(tool_gateway):
    client = openai.OpenAI(base_url=tool_gateway.url + "/s/codex-1/v1", api_key="test")
    items: list[dict] = list(ASK)
    for _ in range(4):
        response = client.responses.create(model="tiny", input=items, tools=[WEATHER], temperature=0,
                                           max_output_tokens=60, store=False, parallel_tool_calls=False)
        (call,) = [o for o in response.output if o.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == CALL_ARGUMENTS
        items += [o.model_dump(exclude_none=True) for o in response.output]
        items.append({"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT})
    calls = tool_gateway.store.calls("codex-1")
    assert [c.branch_reason for c in calls] == [None] * 4
    assert all(c.stitched_from for c in calls[1:])


def test_stream_event_order_conforms(tool_gateway):
    body = {"model": "tiny", "input": ASK, "tools": [WEATHER, {"type": "web_search"}], "temperature": 0,
            "max_output_tokens": 60, "stream": True, "store": False}
    with httpx.stream("POST", tool_gateway.v1 + "/responses", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["x-arborl-ignored-tools"] == "web_search"
        events = [data for _, data in sse_events(response)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    names = [e["type"] for e in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    # each output item: added, its own deltas, its done events, output_item.done, in that order
    i, items = 2, []
    while names[i] != "response.completed":
        assert names[i] == "response.output_item.added"
        item = events[i]["item"]
        i += 1
        if item["type"] == "message":
            assert names[i] == "response.content_part.added"
            i += 1
            while names[i] == "response.output_text.delta":
                i += 1
            assert names[i : i + 2] == ["response.output_text.done", "response.content_part.done"]
            i += 2
        elif item["type"] == "function_call":
            arguments = ""
            while names[i] == "response.function_call_arguments.delta":
                arguments += events[i]["delta"]
                i += 1
            assert names[i] == "response.function_call_arguments.done" and events[i]["arguments"] == arguments
            i += 1
        assert names[i] == "response.output_item.done"
        items.append(events[i]["item"])
        i += 1
    final = events[-1]["response"]
    assert final["output"] == items and final["status"] == "completed"
    assert items[-1]["type"] == "function_call" and json.loads(items[-1]["arguments"]) == CALL_ARGUMENTS
    assert set(final["usage"]) >= {"input_tokens", "input_tokens_details", "output_tokens",
                                   "output_tokens_details", "total_tokens"}


def test_sdk_stream_helpers(tool_gateway):
    client = openai.OpenAI(base_url=tool_gateway.v1, api_key="test")
    with client.responses.stream(model="tiny", input=ASK, tools=[WEATHER], temperature=0, max_output_tokens=60,
                                 store=False) as stream:
        final = stream.get_final_response()
    assert final.output[-1].type == "function_call"


def test_context_overflow_fails_in_stream_and_in_json(gateway):
    long_input = "word " * 6000
    with httpx.stream("POST", gateway.v1 + "/responses", timeout=60,
                      json={"model": "tiny", "input": long_input, "stream": True}) as response:
        events = [data for _, data in sse_events(response)]
    assert [e["type"] for e in events] == ["response.created", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context length"):
        openai.OpenAI(base_url=gateway.v1, api_key="test").responses.create(model="tiny", input=long_input)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "tiny"}, "input"),
        ({"model": "tiny", "input": []}, "input"),
        ({"model": "tiny", "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "nope"),
        ({"model": "tiny", "input": [{"role": "robot", "content": "x"}]}, "robot"),
        ({"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input_image"),
        ({"model": "tiny", "input": "x", "previous_response_id": "resp_1"}, "store"),
        ({"model": "tiny", "input": "x", "tool_choice": {"type": "function", "name": "f"}}, "f"),
    ],
    ids=["no-input", "empty-input", "orphan-output", "bad-role", "image", "previous-response", "unknown-choice"],
)
def test_bad_input_in_openai_format(gateway, body, words):
    response = httpx.post(gateway.v1 + "/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]


def test_parallel_calls_resent_item_by_item_stay_one_path(tiny_model_dir, tmp_path):
    """Codex re-sends a turn as the items it was streamed: the text, each call, then the outputs.

    Text the model writes between and after its calls comes in message items of its own; they
    must rejoin the calls' turn so the next request extends the sampled tokens. Whitespace
    alone between two calls opens no message item: it goes out in front of the next text.
    """
    from transformers import AutoTokenizer

    hermes = get_parser("hermes")
    first = "".join(["Checking them.\n", hermes.format_call("get_weather", {"city": "Paris"}), "\n",
                     hermes.format_call("get_weather", {"city": "Rome"}), "\nthen ",
                     hermes.format_call("get_weather", {"city": "Oslo"})])
    replies = iter([first, "Sunny everywhere."])
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model_dir), lambda prompt: next(replies))
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    items: list[dict] = list(ASK)
    with ServerThread(create_app(engine, store, GatewaySettings(tool_parser="hermes"))) as url:
        for _ in range(2):
            body = {"model": "tiny", "input": items, "tools": [WEATHER], "stream": True, "store": False}
            with httpx.stream("POST", url + "/s/par/v1/responses", json=body, timeout=30) as response:
                events = sse_events(response)
            done = [data["item"] for name, data in events if name == "response.output_item.done"]
            items += done
            items += [{"type": "function_call_output", "call_id": item["call_id"], "output": TOOL_RESULT}
                      for item in done if item["type"] == "function_call"]
    kinds = [(item["type"], item.get("content", [{}])[0].get("text")) for item in items[1:6]]
    assert kinds == [("message", "Checking them.\n"), ("function_call", None), ("function_call", None),
                     ("message", "\n\nthen "), ("function_call", None)]
    calls = store.calls("par")
    assert [c.branch_reason for c in calls] == [None, None] and calls[1].stitched_from == calls[0].id
    turn = calls[1].messages[1]
    assert turn["content"] == calls[0].response_message["content"] and len(turn["tool_calls"]) == 3
    store.close()
