"""The dialects against every engine this machine has: embedded, vLLM (its CPU build), SGLang (GPU).

The same tests run on each engine: Chat Completions, Anthropic Messages, Responses and the Gemini
API, streamed and not, with tools offered and a tool result sent back; a ten-turn conversation
with tools stitches with zero breaks (Chat Completions and Gemini); and the ids recorded are the
engine's own, checked through a side channel (the model itself for the embedded engine, the
server asked directly for vLLM and SGLang). An engine that is not installed here skips with a
message saying how to install it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import torch
from google import genai
from google.genai import types

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore
from conftest import ServerThread

TOOL = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
ANTHROPIC_TOOL = {"name": "read_file", "description": "Read a file of the repository",
                  "input_schema": TOOL["function"]["parameters"]}
GEMINI_TOOL = {"functionDeclarations": [{"name": "read_file", "description": "Read a file of the repository",
                                          "parametersJsonSchema": TOOL["function"]["parameters"]}]}
RESPONSES_TOOL = {"type": "function", "name": "read_file", "description": "Read a file of the repository",
                  "parameters": TOOL["function"]["parameters"]}


@dataclass
class Served:
    url: str
    store: TrajectoryStore
    model_dir: Path
    # the engine's own greedy completion ids for prompt ids (the side channel)
    greedy: Callable[[list[int], int], list[int]]

    def prompt_text(self, session: str) -> str:
        from transformers import AutoTokenizer

        call = self.store.calls(session)[-1]
        return AutoTokenizer.from_pretrained(self.model_dir).decode(self.store.call_tokens(call)[0])


def _embedded(request, tiny_model_dir: Path):
    from arborl.gateway.engines.embedded import EmbeddedEngine

    model = request.getfixturevalue("tiny_model")

    @torch.no_grad()
    def greedy(prompt: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()

    return EmbeddedEngine(tiny_model_dir, model_name="tiny"), tiny_model_dir, greedy


def _vllm(request, tiny_model_dir: Path):
    from arborl.gateway.engines.vllm_server import VllmEngine

    url, model = request.getfixturevalue("vllm_tiny64")

    def greedy(prompt: list[int], n: int) -> list[int]:
        body = {"model": model.name, "prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": True,
                "skip_special_tokens": False}
        return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]

    return VllmEngine(url, model, model_name="tiny"), model, greedy


def _sglang(request, tiny_model_dir: Path):
    from arborl.gateway.engines.sglang_server import SglangEngine

    url, model = request.getfixturevalue("sglang_default")

    def greedy(prompt: list[int], n: int) -> list[int]:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0,
                                                         "skip_special_tokens": False}}
        return httpx.post(url + "/generate", json=body, timeout=60).json()["output_ids"]

    return SglangEngine(url, model, model_name="tiny"), model, greedy


ENGINES = {"embedded": _embedded, "vllm": _vllm, "sglang": _sglang}


@pytest.fixture(params=["embedded", pytest.param("vllm", marks=pytest.mark.slow),
                        pytest.param("sglang", marks=pytest.mark.gpu)])
def served(request, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Served]:
    engine, model_dir, greedy = ENGINES[request.param](request, tiny_model_dir)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(any_model_name=True)
    with ServerThread(create_app(engine, store, settings), settings=settings) as url:
        yield Served(url, store, model_dir, greedy)
    store.close()


def _ok_calls(served: Served, session: str, count: int) -> None:
    calls = served.store.calls(session)
    assert len(calls) == count and all(c.status == "ok" and c.token_exact for c in calls), calls


def test_chat_completions_streamed_and_not(served):
    client = openai.OpenAI(base_url=served.url + "/s/chat/v1", api_key="x")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert any(c.choices and c.choices[0].finish_reason for c in chunks) and chunks[-1].usage is not None
    _ok_calls(served, "chat", 2)


def test_anthropic_messages_streamed_and_not(served):
    client = anthropic.Anthropic(base_url=served.url + "/s/messages", api_key="x")
    message = client.messages.create(model="tiny", max_tokens=6, messages=[{"role": "user", "content": "hi"}])
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens >= 1
    with client.messages.stream(model="tiny", max_tokens=6, messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")
    _ok_calls(served, "messages", 2)


def test_responses_streamed_and_not(served):
    client = openai.OpenAI(base_url=served.url + "/s/responses/v1", api_key="x")
    response = client.responses.create(model="tiny", input="hi", max_output_tokens=6)
    assert response.status in ("completed", "incomplete")
    events = list(client.responses.create(model="tiny", input="hi", max_output_tokens=6, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    _ok_calls(served, "responses", 2)


def _gemini(served: Served, session: str) -> genai.Client:
    return genai.Client(api_key="x", http_options=types.HttpOptions(base_url=f"{served.url}/s/{session}",
                                                                    api_version="v1beta"))


def test_gemini_streamed_and_not(served):
    client = _gemini(served, "gemini")
    config = types.GenerateContentConfig(max_output_tokens=6)
    reply = client.models.generate_content(model="tiny", contents="hi", config=config)
    assert reply.candidates[0].finish_reason in (types.FinishReason.STOP, types.FinishReason.MAX_TOKENS)
    assert reply.usage_metadata.candidates_token_count >= 1
    chunks = list(client.models.generate_content_stream(model="tiny", contents="hi", config=config))
    assert chunks[-1].candidates[0].finish_reason is not None and chunks[-1].usage_metadata is not None
    _ok_calls(served, "gemini", 2)


def test_tools_are_offered_and_a_tool_result_goes_back_in_every_dialect(served):
    """The tool is rendered into the prompt the engine samples from, and a tool result (after a
    call the assistant made) comes back into the next prompt, in each dialect."""
    call_args = json.dumps({"path": "setup.py"})
    chat = openai.OpenAI(base_url=served.url + "/s/tools-chat/v1", api_key="x")
    chat.chat.completions.create(model="tiny", max_tokens=6, tools=[TOOL], messages=[
        {"role": "user", "content": "read setup.py"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": call_args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "print('chat tool result')"}])
    messages = anthropic.Anthropic(base_url=served.url + "/s/tools-messages", api_key="x")
    messages.messages.create(model="tiny", max_tokens=6, tools=[ANTHROPIC_TOOL], messages=[
        {"role": "user", "content": "read setup.py"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                           "input": {"path": "setup.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "print('messages tool result')"}]}])
    responses = openai.OpenAI(base_url=served.url + "/s/tools-responses/v1", api_key="x")
    responses.responses.create(model="tiny", max_output_tokens=6, tools=[RESPONSES_TOOL], input=[
        {"role": "user", "content": "read setup.py"},
        {"type": "function_call", "call_id": "call_2", "name": "read_file", "arguments": call_args},
        {"type": "function_call_output", "call_id": "call_2", "output": "print('responses tool result')"}])
    gemini = httpx.post(served.url + "/s/tools-gemini/v1beta/models/tiny:generateContent", timeout=60, json={
        "tools": [GEMINI_TOOL], "generationConfig": {"maxOutputTokens": 6}, "contents": [
            {"role": "user", "parts": [{"text": "read setup.py"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "read_file", "args": {"path": "setup.py"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "read_file", "response": {
                "output": "print('gemini tool result')"}}}]}]})
    assert gemini.status_code == 200, gemini.text
    for session, dialect in (("tools-chat", "chat"), ("tools-messages", "messages"),
                             ("tools-responses", "responses"), ("tools-gemini", "gemini")):
        _ok_calls(served, session, 1)
        prompt = served.prompt_text(session)
        assert "read_file" in prompt and f"{dialect} tool result" in prompt, prompt


def test_a_ten_turn_conversation_with_tools_stitches_without_a_break(served):
    client = openai.OpenAI(base_url=served.url + "/s/turns/v1", api_key="x")
    messages: list[dict] = [{"role": "system", "content": "You fix bugs with the tools you have."}]
    for turn in range(10):
        messages.append({"role": "user", "content": f"step {turn}: go on"})
        reply = client.chat.completions.create(model="tiny", messages=messages, tools=[TOOL], max_tokens=6,
                                               temperature=0)
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
        for call in message.tool_calls or []:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "ok"})
    calls = served.store.calls("turns")
    assert len(calls) == 10 and [c.branch_reason for c in calls] == [None] * 10
    assert all(c.stitched_from == calls[i].id for i, c in enumerate(calls[1:]))


def test_a_ten_turn_gemini_conversation_with_tools_stitches_without_a_break(served):
    contents: list[dict] = []
    for turn in range(10):
        contents.append({"role": "user", "parts": [{"text": f"step {turn}: go on"}]})
        reply = httpx.post(served.url + "/s/gemini-turns/v1beta/models/tiny:generateContent", timeout=60, json={
            "contents": contents, "tools": [GEMINI_TOOL], "generationConfig": {"maxOutputTokens": 6, "temperature": 0},
            "systemInstruction": {"parts": [{"text": "You fix bugs with the tools you have."}]}})
        assert reply.status_code == 200, reply.text
        content = reply.json()["candidates"][0]["content"]
        contents.append(content)
        responses = [{"functionResponse": {"id": part["functionCall"]["id"], "name": part["functionCall"]["name"],
                                           "response": {"output": "ok"}}}
                     for part in content["parts"] if "functionCall" in part]
        if responses:
            contents.append({"role": "user", "parts": responses})
    calls = served.store.calls("gemini-turns")
    assert len(calls) == 10 and [c.branch_reason for c in calls] == [None] * 10
    assert all(c.stitched_from == calls[i].id for i, c in enumerate(calls[1:]))


def test_the_recorded_ids_are_the_engines_own(served):
    reply = httpx.post(served.url + "/s/direct/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
        "temperature": 0})
    assert reply.status_code == 200, reply.text
    [call] = served.store.calls("direct")
    prompt, completion = served.store.call_tokens(call)
    assert completion == served.greedy(prompt, len(completion))[:len(completion)] and call.token_exact
