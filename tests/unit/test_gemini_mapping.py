"""How Gemini requests map onto the gateway's chat form (gateway/gemini_api.py), without a server."""

from __future__ import annotations

import pytest

from arborl.gateway.errors import InvalidRequest
from arborl.gateway.gemini_api import CandidateParts, json_schema, normalise_contents, tools_and_choice
from arborl.gateway.gemini_schema import GenerateContentRequest
from arborl.gateway.tool_parsers import TextDelta, ToolCallArgsDelta, ToolCallStart


def test_google_schema_becomes_json_schema():
    google = {"type": "OBJECT", "nullable": True, "propertyOrdering": ["a"], "required": ["a"], "properties": {
        "a": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["x", "y"]}},
        "b": {"anyOf": [{"type": "INTEGER"}, {"type": "NUMBER", "nullable": True}]}}}
    assert json_schema(google) == {"type": ["object", "null"], "propertyOrdering": ["a"], "required": ["a"],
                                   "properties": {"a": {"type": "array", "items": {"type": "string",
                                                                                   "enum": ["x", "y"]}},
                                                  "b": {"anyOf": [{"type": "integer"},
                                                                  {"type": ["number", "null"]}]}}}


def _request(**fields) -> GenerateContentRequest:
    return GenerateContentRequest.model_validate({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], **fields})


def test_function_responses_answer_calls_by_id_or_else_by_name_in_order():
    body = _request(contents=[
        {"role": "user", "parts": [{"text": "go"}, {"text": "now"}]},
        {"role": "model", "parts": [{"text": "Two calls."},
                                    {"functionCall": {"name": "f", "args": {"x": 1}}},
                                    {"functionCall": {"name": "f", "args": {"x": 2}, "id": "mine"}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "id": "mine", "response": {"output": "two"}}},
                                   {"functionResponse": {"name": "f", "response": {"error": "boom"}}}]},
    ])
    messages = normalise_contents(body)
    assert messages[0] == {"role": "user", "content": "go\nnow"}
    assert messages[1]["tool_calls"] == [{"id": "f-1-1", "name": "f", "arguments": '{"x": 1}'},
                                         {"id": "mine", "name": "f", "arguments": '{"x": 2}'}]
    assert messages[2:] == [{"role": "tool", "tool_call_id": "mine", "content": "two"},
                            {"role": "tool", "tool_call_id": "f-1-1", "content": "Error: boom"}]


def test_a_second_response_to_one_call_is_refused():
    body = _request(contents=[
        {"role": "model", "parts": [{"functionCall": {"name": "f"}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f"}}, {"functionResponse": {"name": "f"}}]},
    ])
    with pytest.raises(InvalidRequest, match="answers no earlier functionCall"):
        normalise_contents(body)


def test_calling_modes():
    tools = [{"functionDeclarations": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}]
    assert tools_and_choice(_request(tools=tools))[1] == "auto"
    assert tools_and_choice(_request(tools=tools, toolConfig={"functionCallingConfig": {"mode": "NONE"}}))[1] == "none"
    offered, choice = tools_and_choice(_request(tools=tools, toolConfig={"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["a", "c"]}}))
    assert choice == "required" and [t["function"]["name"] for t in offered] == ["a", "c"]
    assert tools_and_choice(_request())[1] is None


def test_parts_stream_whole_calls_and_merge_text():
    parts = CandidateParts(include_thoughts=False)
    sent = [parts.feed(TextDelta("Let")), parts.feed(TextDelta(" me.")), parts.feed(TextDelta("\n")),
            parts.feed(ToolCallStart(0, "c1", "f")), parts.feed(ToolCallArgsDelta(0, '{"x"')),
            parts.feed(ToolCallArgsDelta(0, ': 1}')), parts.finish()]
    assert sent == [[{"text": "Let"}], [{"text": " me."}], [], [], [], [],
                    [{"functionCall": {"id": "c1", "name": "f", "args": {"x": 1}}}]]
    assert parts.content == [{"text": "Let me."}, {"functionCall": {"id": "c1", "name": "f", "args": {"x": 1}}}]
