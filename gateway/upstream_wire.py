"""The two wire formats the ``upstream`` engine speaks to the server it forwards to.

Whatever dialect the client spoke, its request reaches here in the gateway's chat form
(``CompletionRequest``) and leaves as either an OpenAI Chat Completions request or an
Anthropic Messages request; the upstream's stream comes back as the gateway's own events
(text, reasoning, tool-call start and argument pieces) and one ``UpstreamDone``, so the
client's dialect formats it exactly as it formats the embedded engine's output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .completions import CompletionRequest, ReasoningDelta
from .tool_parsers import TextDelta, ToolCall, ToolCallArgsDelta, ToolCallStart

UpstreamApi = Literal["openai", "anthropic"]

# Anthropic's stop reasons in OpenAI's terms (the gateway's finish reasons).
_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                   "pause_turn": "stop", "refusal": "stop"}


@dataclass
class UpstreamDone:
    """The end of an upstream completion: how it finished and what the upstream counted."""

    finish_reason: str
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    matched_stop: str | None = None


class UpstreamStreamError(Exception):
    """The upstream reported an error inside its stream."""


@dataclass
class StreamState:
    """What one upstream stream said so far, gathered for the call record."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # index -> id, name, arguments
    done: UpstreamDone | None = None
    complete: bool = False  # the upstream said the completion ended (not just that the stream closed)

    def calls(self) -> list[ToolCall]:
        return [ToolCall(c["id"], c["name"], c["arguments"] or "{}") for _, c in sorted(self.tool_calls.items())]


# -- OpenAI Chat Completions --------------------------------------------------------------------


def openai_request(request: CompletionRequest, model: str) -> dict[str, Any]:
    messages = []
    for m in request.messages:
        item: dict[str, Any] = {"role": m["role"], "content": m.get("content", "")}
        if m.get("tool_calls"):
            item["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in m["tool_calls"]
            ]
        if m.get("tool_call_id"):
            item["tool_call_id"] = m["tool_call_id"]
        messages.append(item)
    s = request.sampling
    body: dict[str, Any] = {
        "model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
    }
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if request.tools:
        body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
    return body


def openai_events(payload: dict[str, Any], state: StreamState) -> Iterator[Any]:
    """The gateway events in one Chat Completions chunk."""
    if "error" in payload:
        raise UpstreamStreamError(_error_message(payload["error"]))
    usage = payload.get("usage")
    for choice in payload.get("choices") or ():
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            state.reasoning.append(reasoning)
            yield ReasoningDelta(reasoning)
        if delta.get("content"):
            state.content.append(delta["content"])
            yield TextDelta(delta["content"])
        for piece in delta.get("tool_calls") or ():
            index = piece.get("index", 0)
            function = piece.get("function") or {}
            call = state.tool_calls.get(index)
            if call is None:
                call = state.tool_calls[index] = {"id": piece.get("id") or f"call_{index}",
                                                  "name": function.get("name", ""), "arguments": ""}
                yield ToolCallStart(index, call["id"], call["name"])
            if function.get("arguments"):
                call["arguments"] += function["arguments"]
                yield ToolCallArgsDelta(index, function["arguments"])
        if choice.get("finish_reason"):
            state.done = UpstreamDone(choice["finish_reason"])
            state.complete = True
    if usage and state.done is not None:
        state.done.prompt_tokens = usage.get("prompt_tokens", 0)
        state.done.completion_tokens = usage.get("completion_tokens", 0)
        state.done.cached_prompt_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        state.done.reasoning_tokens = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0


# -- Anthropic Messages -------------------------------------------------------------------------


def anthropic_request(request: CompletionRequest, model: str) -> dict[str, Any]:
    system = [m["content"] for m in request.messages if m["role"] == "system" and m.get("content")]
    messages: list[dict[str, Any]] = []

    def add(role: str, block: dict[str, Any]) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].append(block)
        else:
            messages.append({"role": role, "content": [block]})

    for m in request.messages:
        if m["role"] == "system":
            continue
        if m["role"] == "tool":
            add("user", {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m.get("content", "")})
            continue
        if m.get("content"):
            add(m["role"], {"type": "text", "text": m["content"]})
        for call in m.get("tool_calls") or ():
            add("assistant", {"type": "tool_use", "id": call["id"], "name": call["name"],
                              "input": json.loads(call["arguments"] or "{}")})
        if m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"):
            add("assistant", {"type": "text", "text": ""})
    s = request.sampling
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": s.max_tokens, "stream": True,
                            "temperature": min(s.temperature, 1.0)}
    if system:
        body["system"] = "\n\n".join(system)
    if s.top_p < 1.0:
        body["top_p"] = s.top_p
    if s.stop:
        body["stop_sequences"] = list(s.stop)
    if request.tools:
        body["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                          "input_schema": t["function"].get("parameters") or {"type": "object"}}
                         for t in request.tools]
        choice = request.tool_choice
        if choice == "required":
            body["tool_choice"] = {"type": "any"}
        elif choice == "none":
            body["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict):
            body["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
    return body


def anthropic_events(payload: dict[str, Any], state: StreamState) -> Iterator[Any]:
    """The gateway events in one Messages stream event."""
    kind = payload.get("type")
    if kind == "error":
        raise UpstreamStreamError(_error_message(payload.get("error")))
    if kind == "message_start":
        usage = payload.get("message", {}).get("usage") or {}
        state.done = UpstreamDone("stop", prompt_tokens=usage.get("input_tokens", 0)
                                  + usage.get("cache_read_input_tokens", 0),
                                  cached_prompt_tokens=usage.get("cache_read_input_tokens", 0))
    elif kind == "content_block_start":
        block = payload.get("content_block") or {}
        if block.get("type") == "tool_use":
            index = len(state.tool_calls)
            state.tool_calls[index] = {"id": block.get("id", f"toolu_{index}"), "name": block.get("name", ""),
                                       "arguments": "", "block": payload.get("index")}
            yield ToolCallStart(index, state.tool_calls[index]["id"], block.get("name", ""))
    elif kind == "content_block_delta":
        delta = payload.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text"):
            state.content.append(delta["text"])
            yield TextDelta(delta["text"])
        elif delta.get("type") == "thinking_delta" and delta.get("thinking"):
            state.reasoning.append(delta["thinking"])
            yield ReasoningDelta(delta["thinking"])
        elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            for index, call in state.tool_calls.items():
                if call["block"] == payload.get("index"):
                    call["arguments"] += delta["partial_json"]
                    yield ToolCallArgsDelta(index, delta["partial_json"])
    elif kind == "message_delta" and state.done is not None:
        delta = payload.get("delta") or {}
        if delta.get("stop_reason"):
            state.done.finish_reason = _FINISH_REASONS.get(delta["stop_reason"], "stop")
            state.done.matched_stop = delta.get("stop_sequence")
        state.done.completion_tokens = (payload.get("usage") or {}).get("output_tokens", 0)
    elif kind == "message_stop":
        state.complete = state.done is not None


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
