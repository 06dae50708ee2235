"""OpenAI Responses: ``POST /v1/responses``, streaming and not (the dialect Codex CLI speaks).

Input items (messages, ``function_call``, ``function_call_output``, ``reasoning``) become the
gateway's chat form; ``CompletionService`` events become output items and, when streaming,
the event sequence Codex depends on (every event numbered by ``sequence_number``)::

    response.created, response.in_progress,
    per output item: response.output_item.added,
        message:        response.content_part.added, response.output_text.delta*,
                        response.output_text.done, response.content_part.done
        function_call:  response.function_call_arguments.delta*, ...arguments.done
        reasoning:      response.reasoning_text.delta*, response.reasoning_text.done
    response.output_item.done, ..., response.completed   (or response.failed)

Arborl does not store responses: clients send the whole conversation (``store: false``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .completions import CompletionRequest, CompletionResult, ReasoningDelta
from .engines.base import SamplingParams
from .errors import ContextLengthExceeded, GatewayError, InvalidRequest, Overloaded
from .header_values import header_list
from .http_streams import (
    ending_with_error_event,
    last_result,
    until_disconnected,
    with_keepalives,
)
from .json_wire import JSONResponse, sse_event
from .openai_chat import DEFAULT_MAX_TOKENS
from .rendering import ChatMessage
from .request_log import CLIENT_CLOSED_REQUEST
from .responses_schema import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)
from .tool_parsers import TextDelta, ToolCallArgsDelta, ToolCallStart
from .tool_schemas import check_chosen_tool, check_function_tools

router = APIRouter()
log = logging.getLogger(__name__)

# Failures a client can act on (compact, back off) come as response.failed inside the stream.
_FAILED_IN_STREAM = (ContextLengthExceeded, Overloaded)


_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if part.type not in _TEXT_PARTS:
            raise InvalidRequest(f"{where}: content part {part.type!r} is not supported (text only)", param="input")
    return "".join(part.text or "" for part in content)


def normalise_input(body: ResponsesRequest) -> list[ChatMessage]:
    """instructions + input items -> the gateway's chat form."""
    out: list[ChatMessage] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return out + [{"role": "user", "content": body.input}]
    open_calls: set[str] = set()
    pending_reasoning: list[str] = []

    def assistant() -> ChatMessage:
        """The assistant message function calls attach to: the last one, or a new empty one."""
        if not out or out[-1]["role"] != "assistant":
            out.append({"role": "assistant", "content": ""})
        if pending_reasoning:
            out[-1]["reasoning"] = "".join(pending_reasoning)
            pending_reasoning.clear()
        return out[-1]

    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if isinstance(item, MessageItem):
            text = _text(item.content, where)
            if item.role == "assistant":
                last = out[-1] if out else {}
                if last.get("role") == "assistant" and last.get("tool_calls") and not pending_reasoning:
                    # Text the model wrote between or after its tool calls: the stream carried it in
                    # its own message item, but it belongs to the same turn (and the same sampled
                    # reply, which stitching compares this message with).
                    last["content"] += text
                else:
                    out.append({"role": "assistant", "content": text})
                assistant()
            else:
                out.append({"role": "system" if item.role == "developer" else item.role, "content": text})
        elif isinstance(item, FunctionCallItem):
            message = assistant()
            message.setdefault("tool_calls", []).append(
                {"id": item.call_id, "name": item.name, "arguments": item.arguments or "{}"}
            )
            open_calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in open_calls:
                raise InvalidRequest(f"{where}: function_call_output for unknown call_id {item.call_id!r}",
                                     param="input")
            output = item.output
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif isinstance(item, ReasoningItem):
            pending_reasoning.append(_text((item.content or []) + (item.summary or []), where))
        else:
            raise InvalidRequest(f"{where}: input item type {item.type!r} is not supported", param="input")
    return out


def function_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """Function tools in Chat form, and the types of the tools that were ignored (built-in tools
    such as ``web_search`` run at OpenAI, not here)."""
    tools, ignored = [], []
    for tool in body.tools or ():
        if tool.get("type") == "function":
            tools.append({"type": "function", "function": {
                "name": tool.get("name"), "description": tool.get("description") or "",
                "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}})
        else:
            ignored.append(str(tool.get("type")))
    if tools:
        check_function_tools(tools)
    return tools or None, ignored


@router.post("/v1/responses", tags=["openai"])
async def create_response(body: ResponsesRequest, request: Request):
    gateway = request.app.state.gateway
    if body.previous_response_id:
        raise InvalidRequest("arborl stores no responses: send the whole conversation with store: false",
                             param="previous_response_id")
    tools, ignored = function_tools(body)
    if ignored:
        log.info("ignoring tools of types %s (only function tools are served)", [ascii(kind) for kind in ignored])
    choice: Any = body.tool_choice
    if hasattr(choice, "name"):
        check_chosen_tool(tools, choice.name)
        choice = {"type": "function", "function": {"name": choice.name}}
    elif choice == "required" and not tools:
        raise InvalidRequest("tool_choice requires tools", param="tool_choice")
    completion = CompletionRequest(
        session=await gateway.identify(request, body),
        dialect="openai_responses",
        model=body.model,
        messages=normalise_input(body),
        sampling=SamplingParams(
            max_tokens=gateway.settings.capped_max_tokens(body.max_output_tokens or DEFAULT_MAX_TOKENS),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
        ),
        tools=tools,
        tool_choice=choice if tools else None,
        request_body=gateway.raw_body(request),
    )
    headers = {"x-arborl-session": completion.session.id}
    if ignored:
        headers["x-arborl-ignored-tools"] = header_list(ignored)
    shell = _ResponseShell(body)
    try:
        prepared = await gateway.completions.prepare(completion)
    except _FAILED_IN_STREAM as exc:
        if not body.stream:
            raise
        return StreamingResponse(shell.failed_stream(exc), media_type="text/event-stream", headers=headers)
    stream = gateway.completions.stream(prepared)
    if not body.stream:
        result = await until_disconnected(request, last_result(stream))
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(shell.completed(result), headers=headers)
    events = shell.events(stream, gateway.settings.stream_keepalive_s)
    return StreamingResponse(ending_with_error_event(events, shell.failed),
                             media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


class _ResponseShell:
    """The response object around the output items, and the numbered event stream."""

    def __init__(self, body: Any):
        self.id = "resp_" + uuid.uuid4().hex
        self.body = body
        self.created_at = int(time.time())
        self.sequence = 0

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": body.model, "output": output, "instructions": body.instructions,
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) or body.tool_choice is None
            else body.tool_choice.model_dump(),
            "tools": body.tools or [], "temperature": body.temperature, "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens, "store": bool(body.store), "metadata": body.metadata or {},
            "error": None, "incomplete_details": None, "usage": None, **extra,
        }

    def completed(self, result: CompletionResult) -> dict[str, Any]:
        output = _output_items(result)
        incomplete = result.finish_reason == "length"
        return self.response(
            "incomplete" if incomplete else "completed", output,
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            usage=_usage(result),
        )

    def event(self, name: str, **data: Any) -> bytes:
        payload = {"type": name, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return sse_event(name, payload)

    async def failed_stream(self, exc: GatewayError) -> AsyncIterator[bytes]:
        yield self.event("response.created", response=self.response("in_progress", []))
        yield self.failed(exc)

    def failed(self, exc: GatewayError) -> bytes:
        code = exc.code or "server_error"
        return self.event("response.failed", response=self.response(
            "failed", [], error={"code": code, "message": exc.message}))

    async def events(self, stream: AsyncIterator, keepalive_s: float) -> AsyncIterator[bytes]:
        yield self.event("response.created", response=self.response("in_progress", []))
        yield self.event("response.in_progress", response=self.response("in_progress", []))
        items: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        held = ""

        def close() -> list[bytes]:
            if current is None:
                return []
            index = len(items) - 1
            out = []
            if current["type"] == "message":
                text = current["content"][0]["text"]
                out.append(self.event("response.output_text.done", item_id=current["id"], output_index=index,
                                      content_index=0, text=text))
                out.append(self.event("response.content_part.done", item_id=current["id"], output_index=index,
                                      content_index=0, part=current["content"][0]))
            elif current["type"] == "function_call":
                out.append(self.event("response.function_call_arguments.done", item_id=current["id"],
                                      output_index=index, arguments=current["arguments"]))
            else:
                text = current["content"][0]["text"]
                out.append(self.event("response.reasoning_text.done", item_id=current["id"], output_index=index,
                                      content_index=0, text=text))
            current["status"] = "completed"
            out.append(self.event("response.output_item.done", output_index=index, item=current))
            return out

        def open_item(item: dict[str, Any]) -> list[bytes]:
            nonlocal current
            out = close()
            items.append(item)
            current = item
            index = len(items) - 1
            out.append(self.event("response.output_item.added", output_index=index,
                                  item={**item, "status": "in_progress"}))
            if item["type"] == "message":
                out.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            return out

        async for event in with_keepalives(stream, keepalive_s):
            if event is None:  # nothing for a while (a long prefill): say the response is still in progress
                # An event, not an SSE comment: Codex's idle timeout (stream_idle_timeout_ms) counts
                # only events, so a comment would not keep it waiting.
                yield self.event("response.in_progress", response=self.response("in_progress", items))
                continue
            chunks: list[bytes] = []
            index = len(items) - 1
            if isinstance(event, CompletionResult):
                for chunk in close():
                    yield chunk
                current = None
                yield self.event("response.completed", response=self.completed_from(items, event))
                return
            if isinstance(event, ReasoningDelta):
                if current is None or current["type"] != "reasoning":
                    chunks += open_item(_reasoning_item(""))
                    index = len(items) - 1
                assert current is not None  # open or just opened by open_item
                current["content"][0]["text"] += event.text
                chunks.append(self.event("response.reasoning_text.delta", item_id=current["id"],
                                         output_index=index, content_index=0, delta=event.text))
            elif isinstance(event, TextDelta):
                text = event.text
                if current is None or current["type"] != "message":
                    # Whitespace between tool calls (or after the reasoning) opens no message
                    # item of its own; it goes out in front of the next text, if any comes.
                    held += text
                    if not held.strip():
                        continue
                    text, held = held, ""
                    chunks += open_item(_message_item(""))
                    index = len(items) - 1
                assert current is not None  # open or just opened by open_item
                current["content"][0]["text"] += text
                chunks.append(self.event("response.output_text.delta", item_id=current["id"],
                                         output_index=index, content_index=0, delta=text))
            elif isinstance(event, ToolCallStart):
                chunks += open_item(_call_item(event.id, event.name, ""))
            elif isinstance(event, ToolCallArgsDelta):
                assert current is not None  # the call's ToolCallStart opened its item
                current["arguments"] += event.fragment
                chunks.append(self.event("response.function_call_arguments.delta", item_id=current["id"],
                                         output_index=index, delta=event.fragment))
            for chunk in chunks:
                yield chunk

    def completed_from(self, items: list[dict[str, Any]], result: CompletionResult) -> dict[str, Any]:
        """The final response object; its output is exactly the items that were streamed."""
        response = self.completed(result)
        response["output"] = items
        return response


def _message_item(text: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _output_items(result: CompletionResult) -> list[dict[str, Any]]:
    items = []
    if result.reasoning:
        items.append(_reasoning_item(result.reasoning))
    if result.content.strip():
        items.append(_message_item(result.content))
    items += [_call_item(c.id, c.name, c.arguments) for c in result.tool_calls]
    return items


def _usage(result: CompletionResult) -> dict[str, Any]:
    return {
        "input_tokens": result.prompt_tokens,
        "input_tokens_details": {"cached_tokens": result.cached_prompt_tokens},
        "output_tokens": result.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
