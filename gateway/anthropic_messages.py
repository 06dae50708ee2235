"""Anthropic Messages: ``POST /v1/messages`` (also ``?beta=true``) and ``/v1/messages/count_tokens``.

Like the Chat Completions module, this only translates: Anthropic content blocks into the
gateway's chat form, and ``CompletionService`` events into Anthropic's response and its SSE
sequence::

    message_start, ping,
    (content_block_start, content_block_delta*, content_block_stop)*   # thinking, text, tool_use
    message_delta (stop_reason, usage), message_stop

with further ``ping`` events while nothing else comes (a long prefill), so clients with a read
timeout keep waiting. Streamed or not, the content blocks are built by one ``ContentBlocks``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .anthropic_schema import (
    CountTokensRequest,
    Message,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from .completions import CompletionRequest, CompletionResult, ReasoningDelta
from .engines.base import SamplingParams
from .errors import InvalidRequest
from .http_streams import (
    ending_with_error_event,
    until_disconnected,
    with_keepalives,
)
from .json_wire import JSONResponse, sse_event
from .rendering import ChatMessage
from .request_log import CLIENT_CLOSED_REQUEST
from .tool_parsers import TextDelta, ToolCallArgsDelta, ToolCallStart
from .tool_schemas import check_chosen_tool, check_function_tools

router = APIRouter()

_STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens"}


def normalise_messages(body: CountTokensRequest) -> list[ChatMessage]:
    """Anthropic system + messages -> the gateway's chat form."""
    out: list[ChatMessage] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n\n".join(b.text for b in body.system)
        out.append({"role": "system", "content": system})
    open_calls: set[str] = set()
    for i, message in enumerate(body.messages):
        out.extend(_normalise(message, i, open_calls))
    return out


def _normalise(message: Message, index: int, open_calls: set[str]) -> list[ChatMessage]:
    where = f"messages[{index}]"
    blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) else message.content
    texts, calls, results, reasoning = [], [], [], []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock) and message.role == "assistant":
            calls.append({"id": block.id, "name": block.name, "arguments": json.dumps(block.input)})
        elif isinstance(block, ToolResultBlock) and message.role == "user":
            if block.tool_use_id not in open_calls:
                raise InvalidRequest(f"{where}: tool_result for unknown tool_use_id {block.tool_use_id!r}")
            results.append(_tool_result(block))
        elif isinstance(block, ThinkingBlock) and message.role == "assistant":
            reasoning.append(block.thinking)
        elif block.type == "redacted_thinking" and message.role == "assistant":
            continue  # encrypted by another provider: nothing this model can read
        else:
            raise InvalidRequest(f"{where}: content block {block.type!r} is not supported in a {message.role} message")
    if message.role == "assistant":
        item: ChatMessage = {"role": "assistant", "content": "".join(texts)}
        if calls:
            item["tool_calls"] = calls
            open_calls.update(c["id"] for c in calls)
        if reasoning:
            item["reasoning"] = "".join(reasoning)
        return [item]
    out = results
    if texts or not results:
        out = out + [{"role": message.role, "content": "\n".join(texts)}]
    return out


def _tool_result(block: ToolResultBlock) -> ChatMessage:
    content = block.content
    if isinstance(content, list):
        content = "\n".join(part.text if isinstance(part, TextBlock) else str(part.get("text", "")) for part in content)
    text = content or ""
    if block.is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def tools_and_choice(body: CountTokensRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Custom tools in OpenAI function form, and tool_choice in the gateway's terms."""
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description or "",
                                          "parameters": t.input_schema}}
        for t in body.tools or ()
        if t.type in (None, "custom")  # server tools (web search, ...) run at Anthropic, not here
    ] or None
    if tools:
        check_function_tools(tools)
    choice = body.tool_choice
    if choice is None or choice.type == "auto":
        return tools, "auto" if tools else None
    if choice.type == "none":
        return tools, "none"
    if not tools:
        raise InvalidRequest(f"tool_choice {choice.type!r} requires tools")
    if choice.type == "any":
        return tools, "required"
    check_chosen_tool(tools, choice.name or "")
    return tools, {"type": "function", "function": {"name": choice.name}}


def _enable_thinking(body: CountTokensRequest) -> bool | None:
    if body.thinking is None:
        return None
    return body.thinking.type != "disabled"


@router.post("/v1/messages/count_tokens", tags=["anthropic"])
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    gateway = request.app.state.gateway
    await gateway.identify(request, body)
    tools, choice = tools_and_choice(body)
    count = await gateway.count_prompt_tokens(normalise_messages(body), tools, choice, _enable_thinking(body))
    return {"input_tokens": count}


@router.post("/v1/messages", tags=["anthropic"])
async def messages(body: MessagesRequest, request: Request):
    gateway = request.app.state.gateway
    tools, choice = tools_and_choice(body)
    completion = CompletionRequest(
        session=await gateway.identify(request, body),
        dialect="anthropic_messages",
        model=body.model,
        messages=normalise_messages(body),
        sampling=SamplingParams(
            max_tokens=gateway.settings.capped_max_tokens(body.max_tokens),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            stop=tuple(body.stop_sequences or ()),
        ),
        tools=tools,
        tool_choice=choice,
        request_body=gateway.raw_body(request),
        enable_thinking=_enable_thinking(body),
    )
    prepared = await gateway.completions.prepare(completion)
    message_id = "msg_" + uuid.uuid4().hex[:24]
    stream = gateway.completions.stream(prepared)
    headers = {"x-arborl-session": completion.session.id}
    if not body.stream:
        collected = await until_disconnected(request, _collect(stream))
        if collected is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        blocks, result = collected
        return JSONResponse(_message(message_id, body.model, blocks, result), headers=headers)
    events = ending_with_error_event(_sse(stream, message_id, body.model, len(prepared.plan.prompt_ids),
                                          gateway.settings.stream_keepalive_s),
                                     lambda exc: sse_event("error", exc.anthropic_body()))
    return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


def _stop(result: CompletionResult) -> tuple[str, str | None]:
    if isinstance(result.matched_stop, str) and result.finish_reason == "stop":
        return "stop_sequence", result.matched_stop
    return _STOP_REASONS.get(result.finish_reason, "end_turn"), None


def _usage(result: CompletionResult) -> dict[str, int]:
    return {
        "input_tokens": result.prompt_tokens - result.cached_prompt_tokens,
        "cache_read_input_tokens": result.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": result.completion_tokens,
    }


def _message(message_id: str, model: str, blocks: ContentBlocks, result: CompletionResult) -> dict[str, Any]:
    stop_reason, stop_sequence = _stop(result)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": blocks.content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": _usage(result)}


async def _collect(stream: AsyncIterator) -> tuple[ContentBlocks, CompletionResult]:
    """A whole completion as the blocks it streamed, and its result (the non-streaming response)."""
    blocks = ContentBlocks()
    async for event in stream:
        if isinstance(event, CompletionResult):
            blocks.finish()
            return blocks, event
        blocks.feed(event)
    raise AssertionError("the completion stream ended without a result")


class ContentBlocks:
    """Completion events -> Anthropic content blocks, in the order they were generated.

    Both responses are built by it: the stream sends the events ``feed`` and ``finish`` return
    as blocks open, grow and close; the JSON response is ``content``, the list it ends with. So a
    streamed and a non-streamed answer to the same output hold the same blocks in the same order.
    Whitespace-only text is held back and put in front of the next text (a text block of only
    whitespace between two tool calls is one Anthropic's API refuses when a client sends it back);
    held whitespace at the end is dropped. Joined, the text blocks are the reply's text (trailing
    whitespace aside), which is what stitching compares the next request's assistant turn with.
    """

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None  # the kind of the last block, while it can still grow
        self._held = ""
        self._arguments = ""  # the open tool_use block's input, as streamed

    def feed(self, event: Any) -> list[tuple[str, dict[str, Any]]]:
        """The SSE events (name, data) that ``event`` makes."""
        if isinstance(event, ReasoningDelta):
            return self._grow("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                              "thinking", {"type": "thinking_delta", "thinking": event.text})
        if isinstance(event, TextDelta):
            text = self._held + event.text
            if self._open != "text" and not text.strip():
                self._held = text
                return []
            self._held = ""
            return self._grow("text", {"type": "text", "text": ""}, "text", {"type": "text_delta", "text": text})
        if isinstance(event, ToolCallStart):
            out = self._close()
            self._held, self._arguments = "", ""
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            return out + self._start("tool_use", block)
        if isinstance(event, ToolCallArgsDelta):
            self._arguments += event.fragment
            return [("content_block_delta", {"index": len(self.content) - 1,
                                             "delta": {"type": "input_json_delta", "partial_json": event.fragment}})]
        return []

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        self._held = ""
        return self._close()

    def _grow(self, kind: str, empty: dict[str, Any], field: str, delta: dict[str, Any]) -> list[tuple[str, dict]]:
        out = [] if self._open == kind else self._close() + self._start(kind, empty)
        self.content[-1][field] += delta[field]
        return out + [("content_block_delta", {"index": len(self.content) - 1, "delta": delta})]

    def _start(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self.content.append(dict(block))
        self._open = kind
        return [("content_block_start", {"index": len(self.content) - 1, "content_block": block})]

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        if self._open == "tool_use":
            self.content[-1]["input"] = json.loads(self._arguments or "{}")
        self._open = None
        return [("content_block_stop", {"index": len(self.content) - 1})]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return sse_event(name, {"type": name, **data})


async def _sse(
    stream: AsyncIterator, message_id: str, model: str, prompt_tokens: int, keepalive_s: float
) -> AsyncIterator[bytes]:
    start_usage = {"input_tokens": prompt_tokens, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                   "output_tokens": 0}
    yield _event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
    yield _event("ping", {})
    blocks = ContentBlocks()
    async for event in with_keepalives(stream, keepalive_s):
        if event is None:  # nothing for a while (a long prefill): Anthropic's own keep-alive
            yield _event("ping", {})
            continue
        if isinstance(event, CompletionResult):
            for name, data in blocks.finish():
                yield _event(name, data)
            stop_reason, stop_sequence = _stop(event)
            yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": _usage(event)})
            yield _event("message_stop", {})
            return
        for name, data in blocks.feed(event):
            yield _event(name, data)
