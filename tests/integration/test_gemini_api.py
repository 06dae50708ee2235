"""The official google-genai SDK against the Gemini routes of a live gateway, and the wire itself.

Function calls come from the tiny tool-calling model (``tool_caller``), so they are real parsed
calls; a 10-turn conversation of them must stitch into one unbroken trie path, as the other
dialects do.
"""

from __future__ import annotations

import json

import httpx
import pytest
from google import genai
from google.genai import types

from tool_caller import CALL_ARGUMENTS, TOOL_RESULT

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
# The same declaration in Google's own Schema form (upper-case types), as older clients send it.
WEATHER_OPENAPI = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]},
}
ASK = [{"role": "user", "parts": [{"text": "What is the weather in Paris?"}]}]
GREEDY = {"temperature": 0, "maxOutputTokens": 60}


_CLIENTS: list[genai.Client] = []  # a Client closes its connections when collected: keep each alive


def _client(live, session: str | None = None, version: str = "v1beta") -> genai.Client:
    base = live.url + (f"/s/{session}" if session else "")
    client = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=base, api_version=version))
    _CLIENTS.append(client)
    return client


def _post(live, route: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{live.url}/v1beta/models/tiny:{route}", json=body, timeout=60, **kwargs)


def _sse_chunks(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_content_with_the_sdk(gateway):
    reply = _client(gateway).models.generate_content(
        model="tiny", contents="Hello",
        config=types.GenerateContentConfig(system_instruction="Be brief.", max_output_tokens=12, temperature=0.5,
                                           top_p=0.9, top_k=20, stop_sequences=["\n\n"],
                                           safety_settings=[types.SafetySetting(
                                               category="HARM_CATEGORY_HARASSMENT", threshold="BLOCK_NONE")]))
    candidate = reply.candidates[0]
    assert candidate.finish_reason in (types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
    assert candidate.content.role == "model"
    usage = reply.usage_metadata
    assert usage.prompt_token_count > 0 and usage.candidates_token_count > 0
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    (call,) = gateway.store.calls(gateway.store.sessions()[0]["id"])
    assert call.dialect == "gemini" and call.completion_len == usage.candidates_token_count
    assert call.messages[0] == {"role": "system", "content": "Be brief."}
    assert (reply.text or "") == call.response_message["content"]


def test_streaming_text_with_the_sdk_joins_to_the_recorded_reply(gateway):
    chunks = list(_client(gateway, "gem-stream").models.generate_content_stream(
        model="tiny", contents="Tell me a story", config=types.GenerateContentConfig(max_output_tokens=16)))
    assert len(chunks) > 1
    assert chunks[-1].candidates[0].finish_reason is not None
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage_metadata.candidates_token_count > 0
    (call,) = gateway.store.calls("gem-stream")
    assert "".join(c.text or "" for c in chunks) == call.response_message["content"]


def test_function_call_loop_is_one_path(tool_gateway):
    """Ten function-call round trips, each reply sent back as the client got it: zero breaks."""
    contents = list(ASK)
    for _ in range(10):
        response = _post(tool_gateway, "generateContent",
                         {"contents": contents, "tools": [{"functionDeclarations": [WEATHER]}],
                          "generationConfig": GREEDY}, headers={"x-arborl-session": "gem-loop"})
        assert response.status_code == 200, response.text
        candidate = response.json()["candidates"][0]
        assert candidate["finishReason"] == "STOP"
        (call,) = [p["functionCall"] for p in candidate["content"]["parts"] if "functionCall" in p]
        assert call["name"] == "get_weather" and call["args"] == CALL_ARGUMENTS and call["id"]
        contents.append(candidate["content"])
        contents.append({"role": "user", "parts": [{"functionResponse": {
            "id": call["id"], "name": "get_weather", "response": {"output": TOOL_RESULT}}}]})
    calls = tool_gateway.store.calls("gem-loop")
    assert [c.branch_reason for c in calls] == [None] * 10
    assert all(c.stitched_from for c in calls[1:])
    trie = tool_gateway.store.trie("gem-loop")
    assert trie.num_tokens == calls[-1].prompt_len + calls[-1].completion_len
    # Each function response is the tool message answering its call.
    assert {"role": "tool", "tool_call_id": contents[-3]["parts"][0]["functionResponse"]["id"],
            "content": TOOL_RESULT} in calls[-1].messages


def test_streamed_function_call_with_the_sdk(tool_gateway):
    chunks = list(_client(tool_gateway).models.generate_content_stream(
        model="tiny", contents="What is the weather in Paris?",
        config=types.GenerateContentConfig(
            temperature=0, max_output_tokens=60,
            tools=[types.Tool(function_declarations=[types.FunctionDeclaration(**{
                "name": "get_weather", "description": "Current weather in a city",
                "parameters_json_schema": WEATHER["parametersJsonSchema"]})])],
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))))
    calls = [call for chunk in chunks for call in (chunk.function_calls or ())]
    assert [(c.name, c.args) for c in calls] == [("get_weather", CALL_ARGUMENTS)]
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP


def test_google_schema_form_and_forced_call(tool_gateway):
    """``parameters`` in Google's upper-case Schema form is accepted; mode ANY with one allowed name
    forces that call."""
    response = _post(tool_gateway, "generateContent", {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "tools": [{"functionDeclarations": [WEATHER_OPENAPI]}, {"googleSearch": {}}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": GREEDY})
    assert response.status_code == 200, response.text
    parts = response.json()["candidates"][0]["content"]["parts"]
    assert [p["functionCall"]["name"] for p in parts if "functionCall" in p] == ["get_weather"]
    (call,) = tool_gateway.store.calls(tool_gateway.store.sessions()[0]["id"])
    prompt = tool_gateway.engine.tokenizer.decode(tool_gateway.store.call_tokens(call)[0])
    assert '"city": {"type": "string"}' in prompt, prompt  # the schema, in JSON Schema's lower case


def test_sse_wire_and_array_stream(tool_gateway):
    """alt=sse: ``data:`` lines of GenerateContentResponse, the last with finishReason and usage;
    without alt=sse, one JSON array of responses."""
    body = {"contents": ASK, "tools": [{"functionDeclarations": [WEATHER]}], "generationConfig": GREEDY}
    with httpx.stream("POST", f"{tool_gateway.url}/v1beta/models/tiny:streamGenerateContent?alt=sse",
                      json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = _sse_chunks(response)
    assert all(c["candidates"][0]["content"]["role"] == "model" for c in chunks)
    assert "finishReason" in chunks[-1]["candidates"][0] and "usageMetadata" in chunks[-1]
    assert not any("finishReason" in c["candidates"][0] or "usageMetadata" in c for c in chunks[:-1])
    assert len({c["responseId"] for c in chunks}) == 1
    streamed_calls = [p["functionCall"] for c in chunks for p in c["candidates"][0]["content"]["parts"]
                      if "functionCall" in p]
    array = _post(tool_gateway, "streamGenerateContent", body)
    assert array.status_code == 200 and isinstance(array.json(), list)
    (whole,) = array.json()
    assert [p["functionCall"] for p in whole["candidates"][0]["content"]["parts"] if "functionCall" in p] == [
        {**c, "id": whole["candidates"][0]["content"]["parts"][-1]["functionCall"]["id"]} for c in streamed_calls]


def test_count_tokens_and_models(gateway):
    client = _client(gateway)
    counted = client.models.count_tokens(model="tiny", contents="Hello there")
    reply = _post(gateway, "generateContent", {"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}],
                                               "generationConfig": {"maxOutputTokens": 1}})
    assert counted.total_tokens == reply.json()["usageMetadata"]["promptTokenCount"]
    request = {"contents": [{"role": "user", "parts": [{"text": "Hello there"}]}],
               "systemInstruction": {"parts": [{"text": "Be brief and kind to everyone."}]},
               "generationConfig": {"maxOutputTokens": 1}}
    whole = _post(gateway, "countTokens", {"generateContentRequest": request})
    assert whole.json()["totalTokens"] == _post(gateway, "generateContent", request).json()[
        "usageMetadata"]["promptTokenCount"] != counted.total_tokens
    models = httpx.get(gateway.url + "/v1beta/models", timeout=10).json()["models"]
    assert [m["name"] for m in models] == ["models/tiny"]
    assert "generateContent" in models[0]["supportedGenerationMethods"]
    assert httpx.get(gateway.url + "/v1beta/models/tiny", timeout=10).json()["name"] == "models/tiny"
    assert [m.name for m in client.models.list()] == ["models/tiny"]


def test_thought_parts_are_reasoning(gateway):
    """A model turn's ``thought: true`` parts are its reasoning, not its text."""
    body = {"contents": [
        {"role": "user", "parts": [{"text": "Hi"}]},
        {"role": "model", "parts": [{"text": "The user greets me.", "thought": True},
                                    {"text": "Hello!", "thoughtSignature": "c2ln"}]},
        {"role": "user", "parts": [{"text": "Bye"}]}], "generationConfig": {"maxOutputTokens": 2}}
    assert _post(gateway, "generateContent", body).status_code == 200
    (call,) = gateway.store.calls(gateway.store.sessions()[0]["id"])
    assert call.messages[1] == {"role": "assistant", "content": "Hello!", "reasoning": "The user greets me."}


def test_key_from_header_or_query(tiny_model_dir, tmp_path):
    from conftest import serve_live

    key = "gemini-key-0123456789"
    for live in serve_live(tiny_model_dir, tmp_path, api_keys=[key]):
        body = {"contents": ASK, "generationConfig": {"maxOutputTokens": 2}}
        assert _post(live, "generateContent", body, headers={"x-goog-api-key": key}).status_code == 200
        assert _post(live, "generateContent", body, params={"key": key}).status_code == 200
        refused = _post(live, "generateContent", body, params={"key": "wrong"})
        assert refused.status_code == 401
        assert refused.json()["error"] == {"code": 401, "status": "UNAUTHENTICATED",
                                           "message": refused.json()["error"]["message"]}
        # ?key= is Google's alone: an OpenAI route does not read it
        chat = httpx.post(live.v1 + "/chat/completions", params={"key": key}, timeout=30,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 401 and "type" in chat.json()["error"]


@pytest.mark.parametrize(("body", "status", "words"), [
    ({}, 400, ("contents",)),
    ({"contents": []}, 400, ("contents",)),
    ({"contents": [{"role": "user", "parts": []}]}, 400, ("parts",)),
    ({"contents": [{"role": "robot", "parts": [{"text": "x"}]}]}, 400, ("role",)),
    ({"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]},
     400, ("inlineData", "not supported")),
    ({"contents": [{"role": "user", "parts": [{}]}]}, 400, ("needs text",)),
    ({"contents": [{"role": "user", "parts": [{"functionCall": {"name": "f", "args": {}}}]}]},
     400, ("functionCall", "model turn")),
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     400, ("answers no earlier functionCall",)),
    ({"contents": ASK, "generationConfig": {"temperature": 3}}, 400, ("temperature",)),
    ({"contents": ASK, "generationConfig": {"maxOutputTokens": 0}}, 400, ("maxOutputTokens",)),
    ({"contents": ASK, "generationConfig": {"candidateCount": 2}}, 400, ("candidateCount",)),
    ({"contents": ASK, "generationConfig": {"stopSequences": [""]}}, 400, ("stopSequences",)),
    ({"contents": ASK, "tools": [{"functionDeclarations": [{"name": "bad name!"}]}]}, 400, ("name",)),
    ({"contents": ASK, "tools": [{"functionDeclarations": [WEATHER, WEATHER]}]}, 400, ("unique",)),
    ({"contents": ASK, "tools": [{"functionDeclarations": [
        {"name": "f", "parametersJsonSchema": {"type": "nonsense"}}]}]}, 400, ("JSON schema",)),
    ({"contents": ASK, "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}}, 400, ("requires",)),
    ({"contents": ASK, "tools": [{"functionDeclarations": [WEATHER]}],
      "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["nope"]}}},
     400, ("nope",)),
    ({"contents": ASK, "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}}}, 400, ("mode",)),
    ({"contents": ASK, "systemInstruction": {"parts": [{"functionCall": {"name": "f"}}]}}, 400, ("text",)),
])
def test_bad_input_is_a_400_in_googles_shape(gateway, body, status, words):
    response = _post(gateway, "generateContent", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == "INVALID_ARGUMENT"
    assert all(w.lower() in error["message"].lower() for w in words), error["message"]


def test_unknown_model_route_and_body_errors(gateway):
    unknown = httpx.post(gateway.url + "/v1beta/models/gpt-9:generateContent", json={"contents": ASK}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"
    # an unserved method: the path names a model resource, which answers GET only
    route = httpx.post(gateway.url + "/v1beta/models/tiny:embedContent", json={"contents": ASK}, timeout=30)
    assert route.status_code == 405 and route.json()["error"]["status"] == "UNIMPLEMENTED"
    nowhere = httpx.post(gateway.url + "/v1beta/files", json={}, timeout=30)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["status"] == "NOT_FOUND"
    missing = httpx.get(gateway.url + "/v1beta/models/gpt-9", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    broken = httpx.post(gateway.url + "/v1beta/models/tiny:generateContent", content=b"{nope", timeout=30,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["status"] == "INVALID_ARGUMENT"
    count = _post(gateway, "countTokens", {})
    assert count.status_code == 400 and "contents" in count.json()["error"]["message"]


def test_context_overflow_in_googles_words(tiny_model_dir, tmp_path):
    from conftest import serve_live

    for live in serve_live(tiny_model_dir, tmp_path):
        text = "word " * (int(live.engine.context_length) + 10)
        response = _post(live, "generateContent", {"contents": [{"role": "user", "parts": [{"text": text}]}]})
        assert response.status_code == 400, response.text
        assert "exceeds the maximum number of tokens" in response.json()["error"]["message"]
        stream = httpx.post(f"{live.url}/v1beta/models/tiny:streamGenerateContent?alt=sse", timeout=60,
                            json={"contents": [{"role": "user", "parts": [{"text": text}]}]})
        assert stream.status_code == 400 and stream.json()["error"]["status"] == "INVALID_ARGUMENT"
