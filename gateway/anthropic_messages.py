"""Anthropic Messages: ``POST /v1/messages`` (also ``?beta=true``) and ``/v1/messages/count_tokens``.

Like the Chat Completions module, this only translates: Anthropic content blocks into the
gateway's chat form, and ``CompletionService`` events into Anthropic's response and its SSE
sequence::

    message_start, ping,
    (content_block_start, content_block_delta*, content_block_stop)*   # thinking, text, tool_use
    message_delta (stop_reason, usage), message_stop

with further ``ping`` events while the prompt is still being prefilled.
"""

from __future__ import annotations

import asyncio
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
from .http_streams import CLIENT_CLOSED_REQUEST, ending_with_error_event, last_result, until_disconnected
from .json_wire import JSONResponse, sse_event
from .rendering import ChatMessage
from .tool_parsers import TextDelta, ToolCallArgsDelta, ToolCallStart
from .tool_schemas import check_chosen_tool, check_function_tools

router = APIRouter()

PING_SECONDS = 5.0
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
    gateway.identify(request, body)
    if gateway.renderer is None:
        raise InvalidRequest("count_tokens needs a tokenizer: this gateway forwards to an upstream without one "
                             "(set engine.tokenizer)")
    tools, choice = tools_and_choice(body)
    renderer, messages = gateway.renderer, normalise_messages(body)

    def count() -> int:  # in a worker thread: tokenising a long conversation must not stall the event loop
        rendered = renderer.render(messages, tools, tool_choice=choice, enable_thinking=_enable_thinking(body))
        return len(renderer.encode(rendered.text))

    return {"input_tokens": await asyncio.to_thread(count)}


@router.post("/v1/messages", tags=["anthropic"])
async def messages(body: MessagesRequest, request: Request):
    gateway = request.app.state.gateway
    tools, choice = tools_and_choice(body)
    completion = CompletionRequest(
        session=gateway.identify(request, body),
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
        result = await until_disconnected(request, last_result(stream))
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(_message(message_id, body.model, result), headers=headers)
    events = ending_with_error_event(_sse(stream, message_id, body.model, len(prepared.plan.prompt_ids)),
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


def _message(message_id: str, model: str, result: CompletionResult) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if result.reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    if result.content:
        content.append({"type": "text", "text": result.content})
    for call in result.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
    stop_reason, stop_sequence = _stop(result)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": _usage(result)}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return sse_event(name, {"type": name, **data})


async def _with_pings(stream: AsyncIterator, seconds: float) -> AsyncIterator[Any]:
    """The stream's events, with None whenever nothing arrived for ``seconds`` (a long prefill)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for event in stream:
                await queue.put(event)
        except Exception as exc:  # noqa: BLE001 - re-raised to the consumer
            await queue.put(exc)
        finally:
            await queue.put(end)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), seconds)
            except TimeoutError:
                yield None
                continue
            if event is end:
                return
            if isinstance(event, Exception):
                raise event
            yield event
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()


async def _sse(stream: AsyncIterator, message_id: str, model: str, prompt_tokens: int) -> AsyncIterator[bytes]:
    start_usage = {"input_tokens": prompt_tokens, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                   "output_tokens": 0}
    yield _event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
    yield _event("ping", {})
    index, open_kind = -1, None  # the content block being streamed

    def close() -> list[bytes]:
        return [_event("content_block_stop", {"index": index})] if open_kind else []

    async for event in _with_pings(stream, PING_SECONDS):
        if event is None:
            yield _event("ping", {})
            continue
        if isinstance(event, CompletionResult):
            for chunk in close():
                yield chunk
            stop_reason, stop_sequence = _stop(event)
            yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": _usage(event)})
            yield _event("message_stop", {})
            return
        kind = {ReasoningDelta: "thinking", TextDelta: "text", ToolCallStart: "tool_use"}.get(type(event))
        if kind is not None and (kind != open_kind or kind == "tool_use"):
            for chunk in close():
                yield chunk
            index, open_kind = index + 1, kind
            block = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                     "text": {"type": "text", "text": ""}}.get(kind)
            if isinstance(event, ToolCallStart):
                block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            yield _event("content_block_start", {"index": index, "content_block": block})
        if isinstance(event, ReasoningDelta):
            delta = {"type": "thinking_delta", "thinking": event.text}
        elif isinstance(event, TextDelta):
            delta = {"type": "text_delta", "text": event.text}
        elif isinstance(event, ToolCallArgsDelta):
            delta = {"type": "input_json_delta", "partial_json": event.fragment}
        else:
            continue
        yield _event("content_block_delta", {"index": index, "delta": delta})
