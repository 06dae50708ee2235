"""A forced tool call (tool_choice "required", Anthropic "any", a named tool) names a declared tool
and carries arguments that parse, in every dialect, streamed or not, even from a model that has
never learnt to call tools (the tiny random model): the engine constrains its sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from conftest import LiveGateway, serve_live
from sse import sse_events

WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TIME = {"name": "get_time", "description": "The time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from serve_live(tiny_model_dir, tmp_path_factory.mktemp("forced"))


def _chat(live: LiveGateway, choice, stream: bool, tools=(WEATHER,)) -> list[tuple[str, str]]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": ASK}], "max_tokens": 48, "seed": 3,
            "tools": [{"type": "function", "function": t} for t in tools], "tool_choice": choice, "stream": stream}
    if not stream:
        message = httpx.post(live.v1 + "/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
        return [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    calls: dict[int, list[str]] = {}
    with httpx.stream("POST", live.v1 + "/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice_ in json.loads(line[6:])["choices"]:
                    for call in choice_["delta"].get("tool_calls") or []:
                        entry = calls.setdefault(call["index"], ["", ""])
                        entry[0] += call.get("function", {}).get("name") or ""
                        entry[1] += call.get("function", {}).get("arguments") or ""
    return [(name, arguments) for name, arguments in calls.values()]


def _messages(live: LiveGateway, choice, stream: bool) -> list[tuple[str, str]]:
    body = {"model": "tiny", "max_tokens": 48, "messages": [{"role": "user", "content": ASK}], "stream": stream,
            "tools": [{"name": WEATHER["name"], "input_schema": WEATHER["parameters"]}], "tool_choice": choice}
    if not stream:
        content = httpx.post(live.url + "/v1/messages", json=body, timeout=120).json()["content"]
        return [(b["name"], json.dumps(b["input"])) for b in content if b["type"] == "tool_use"]
    calls, arguments = [], ""
    with httpx.stream("POST", live.url + "/v1/messages", json=body, timeout=120) as response:
        for name, data in sse_events(response):
            if name == "content_block_start" and data["content_block"]["type"] == "tool_use":
                calls.append(data["content_block"]["name"])
                arguments = ""
            elif name == "content_block_delta" and data["delta"]["type"] == "input_json_delta" and len(calls) == 1:
                arguments += data["delta"]["partial_json"]  # the first call's arguments
    return [(calls[0], arguments or "{}")] if calls else []


def _responses(live: LiveGateway, choice, stream: bool) -> list[tuple[str, str]]:
    body = {"model": "tiny", "input": ASK, "max_output_tokens": 48, "tools": [{"type": "function", **WEATHER}],
            "tool_choice": choice, "stream": stream}
    if not stream:
        output = httpx.post(live.v1 + "/responses", json=body, timeout=120).json()["output"]
    else:
        with httpx.stream("POST", live.v1 + "/responses", json=body, timeout=120) as response:
            output = sse_events(response)[-1][1]["response"]["output"]
    return [(item["name"], item["arguments"]) for item in output if item["type"] == "function_call"]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("dialect", "choice"), [
    ("chat", "required"),
    ("chat", {"type": "function", "function": {"name": "get_weather"}}),
    ("messages", {"type": "any"}),
    ("messages", {"type": "tool", "name": "get_weather"}),
    ("responses", "required"),
    ("responses", {"type": "function", "name": "get_weather"}),
], ids=["chat-required", "chat-named", "messages-any", "messages-tool", "responses-required", "responses-named"])
def test_a_forced_call_names_a_declared_tool_with_arguments_that_parse(live: LiveGateway, dialect, choice, stream):
    calls = {"chat": _chat, "messages": _messages, "responses": _responses}[dialect](live, choice, stream)
    assert calls, f"no tool call came back ({dialect}, {choice})"
    name, arguments = calls[0]
    assert name == "get_weather"
    assert isinstance(json.loads(arguments), dict), arguments


@pytest.mark.slow
def test_a_required_call_chooses_among_the_declared_tools_only(live: LiveGateway):
    for _ in range(2):
        (name, arguments), *_ = _chat(live, "required", stream=False, tools=(WEATHER, TIME))
        assert name in ("get_weather", "get_time") and isinstance(json.loads(arguments), dict)


@pytest.mark.slow
def test_a_forced_call_ends_within_a_budget_just_long_enough(live: LiveGateway):
    """With a token budget only just longer than the call's shortest ending, the call is closed in
    time (its ending written token by token) instead of being cut off as text."""
    tokenizer = live.engine.tokenizer
    ending = 'get_weather", "arguments": {}}\n</tool_call>'  # the shortest way from the prompt's opening
    budget = len(tokenizer.encode(ending, add_special_tokens=False)) + 1
    body = {"model": "tiny", "messages": [{"role": "user", "content": ASK}], "max_tokens": budget, "seed": 3,
            "tools": [{"type": "function", "function": WEATHER}], "tool_choice": "required"}
    for seed in range(3):
        message = httpx.post(live.v1 + "/chat/completions", json=body | {"seed": seed}, timeout=120).json()
        calls = message["choices"][0]["message"].get("tool_calls")
        assert calls and calls[0]["function"]["name"] == "get_weather", message
        assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)
