"""OpenAI Chat Completions: ``POST /v1/chat/completions``, streaming and not.

This module only translates: the request into a ``CompletionRequest`` (normalised messages,
sampling parameters), and ``CompletionService`` events into Chat Completions JSON or SSE chunks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .completions import CompletionRequest, CompletionResult, ReasoningDelta, TokenLogprob
from .engines.base import SamplingParams
from .errors import InvalidRequest
from .http_streams import (
    SSE_KEEPALIVE,
    ending_with_error_event,
    last_result,
    until_disconnected,
    with_keepalives,
)
from .json_wire import JSONResponse, sse_event
from .openai_chat_schema import ChatCompletionRequest, Message, NamedToolChoice, TextPart
from .rendering import ChatMessage
from .request_log import CLIENT_CLOSED_REQUEST
from .settings import GatewaySettings
from .tool_parsers import TextDelta, ToolCallArgsDelta, ToolCallStart
from .tool_schemas import check_chosen_tool, check_function_tools

router = APIRouter()

DEFAULT_MAX_TOKENS = 1024


def normalise_messages(messages: list[Message]) -> list[ChatMessage]:
    """OpenAI messages -> the gateway's chat form; refuses what the model cannot be given."""
    out: list[ChatMessage] = []
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        item: ChatMessage = {"role": role, "content": _text_content(message, i)}
        if message.role == "assistant":
            if message.tool_calls:
                item["tool_calls"] = [
                    {"id": c.id, "name": c.function.name, "arguments": c.function.arguments or "{}"}
                    for c in message.tool_calls
                ]
                open_calls.update(c.id for c in message.tool_calls)
            if message.reasoning_content:
                item["reasoning"] = message.reasoning_content
        elif message.tool_calls:
            raise InvalidRequest(f"messages[{i}]: only assistant messages may carry tool_calls", param="messages")
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequest(f"messages[{i}]: a tool message needs tool_call_id", param="messages")
            if message.tool_call_id not in open_calls:
                raise InvalidRequest(
                    f"messages[{i}]: tool_call_id {message.tool_call_id!r} does not answer any earlier tool call",
                    param="messages",
                )
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


def _text_content(message: Message, index: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise InvalidRequest(f"messages[{index}]: content is required for role {message.role!r}", param="messages")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, TextPart):
            raise InvalidRequest(
                f"messages[{index}]: content part type {part.type!r} is not supported (text only)",
                param="messages",
            )
        texts.append(part.text)
    return "".join(texts)


def validate_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice requires tools", param="tool_choice")
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    check_function_tools(tools)
    if body.tool_choice is not None and not isinstance(body.tool_choice, str):
        check_chosen_tool(tools, body.tool_choice.function.name)
    return tools


def sampling_params(body: ChatCompletionRequest, settings: GatewaySettings) -> SamplingParams:
    max_tokens = settings.capped_max_tokens(body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_logprobs = body.top_logprobs or 0
    if top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        top_logprobs=top_logprobs,
    )


def _logprob_items(items: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": item.text,
            "logprob": item.logprob,
            "bytes": list(item.text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in item.top],
        }
        for item in items
    ]


def _usage(results: list[CompletionResult]) -> dict[str, Any]:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": results[0].cached_prompt_tokens if results else 0},
        "completion_tokens_details": {"reasoning_tokens": sum(r.reasoning_tokens for r in results)},
    }


def _message(result: CompletionResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content or None}
    if not result.tool_calls and message["content"] is None:
        message["content"] = ""
    if result.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    return message


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gateway = request.app.state.gateway
    completion = CompletionRequest(
        session=await gateway.identify(request, body),
        dialect="openai_chat",
        model=body.model,
        messages=normalise_messages(body.messages),
        sampling=sampling_params(body, gateway.settings),
        tools=validate_tools(body),
        tool_choice=(body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice)
                     else body.tool_choice),
        request_body=gateway.raw_body(request),
    )
    n = body.n or 1
    prepared = await gateway.completions.prepare(completion, streams=n)
    want_logprobs = bool(body.logprobs)
    created = int(time.time())
    response_id = "chatcmpl-" + completion.session.id[-8:] + format(time.time_ns() % 16**12, "x")
    streams = [gateway.completions.stream(prepared, want_logprobs=want_logprobs) for _ in range(n)]
    header = {"id": response_id, "created": created, "model": completion.model, "system_fingerprint": None}

    if not body.stream:
        results = await until_disconnected(request, asyncio.gather(*(last_result(s) for s in streams)))
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {
                "index": i,
                "message": _message(r),
                "logprobs": {"content": _logprob_items(r.logprobs)} if want_logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return JSONResponse(
            {**header, "object": "chat.completion", "choices": choices, "usage": _usage(results)},
            headers={"x-arborl-session": completion.session.id},
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # Headers are gone once streaming: a failure is reported in the stream, the way OpenAI does.
    keepalive_s = gateway.settings.stream_keepalive_s
    chunks = ending_with_error_event(_sse_chunks(streams, header, want_logprobs, include_usage, keepalive_s),
                                     lambda exc: sse_event(None, exc.openai_body()))
    return StreamingResponse(
        chunks, media_type="text/event-stream", headers={"x-arborl-session": completion.session.id,
                                                         "cache-control": "no-cache"},
    )


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several choices as they come, tagged with the choice index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, event = await queue.get()
            if event is done:
                remaining -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sse_chunks(
    streams: list[AsyncIterator], header: dict[str, Any], want_logprobs: bool, include_usage: bool,
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body = {**header, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse_event(None, body)

    results: list[CompletionResult] = []
    # Logprobs ride on the next chunk of their choice (the parser may hold text back a while).
    pending: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(streams))}

    def logprobs_of(index: int) -> dict[str, Any] | None:
        items, pending[index] = pending[index], []
        return {"content": _logprob_items(items)} if want_logprobs else None

    for index in range(len(streams)):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for item in with_keepalives(_merged(streams), keepalive_s):
        if item is None:  # nothing for a while (a long prefill): an SSE comment keeps the client waiting
            yield SSE_KEEPALIVE
            continue
        index, event = item
        delta = _delta(event)
        if isinstance(event, TokenLogprob):
            pending[index].append(event)
        elif isinstance(event, CompletionResult):
            results.append(event)
            yield chunk([{"index": index, "delta": {}, "logprobs": logprobs_of(index),
                          "finish_reason": event.finish_reason}])
        elif delta is not None:
            yield chunk([{"index": index, "delta": delta, "logprobs": logprobs_of(index),
                          "finish_reason": None}])
    if include_usage:
        yield chunk([], _usage(results))
    yield b"data: [DONE]\n\n"


def _delta(event: Any) -> dict[str, Any] | None:
    """The Chat Completions delta for a content or tool-call event."""
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolCallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    if isinstance(event, ToolCallArgsDelta):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}
    return None
