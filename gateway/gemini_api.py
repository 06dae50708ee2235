"""The Gemini API: ``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent``
(SSE with ``?alt=sse``), ``:countTokens``, and ``GET /v1beta/models`` (Gemini CLI speaks this). The
POST routes are served under ``/v1`` too, the Python SDK's default version.

Like the other dialects this only translates: Gemini contents into the gateway's chat form, and
``CompletionService`` events into a ``GenerateContentResponse``. Streamed, the response is a
sequence of such responses, one SSE ``data:`` line each, that the client concatenates part by
part::

    {"candidates": [{"content": {"role": "model", "parts": [{"text": "Let me"}]}, "index": 0}], ...}
    {"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {...}}]}, ...}], ...}
    {"candidates": [{"content": ..., "finishReason": "STOP", "index": 0}], "usageMetadata": {...}}

The last one carries ``finishReason`` and ``usageMetadata``. A function call is sent whole, once its
arguments are complete, as Google sends it. A stream that fails after its 200 ends with one
``data:`` line holding Google's error object. While nothing comes (a long prefill) the stream
sends SSE comments, which every SSE reader skips.

Mapping (Gemini -> the gateway's chat form):
- ``systemInstruction`` -> a system message; ``user`` contents -> user messages; ``model``
  contents -> assistant messages (``thought: true`` parts are its reasoning);
- ``functionCall`` parts -> tool calls, with the client's ``id`` or, where it sent none, one
  made from the call's place (``{name}-{content index}-{part index}``);
- ``functionResponse`` parts -> tool messages answering the call with the same ``id`` or, without
  one, the earliest unanswered call of that name; a response to no call is a 400. The response
  object becomes the tool's text: its ``output`` if that is all it holds, ``Error: {error}`` if
  it holds an ``error`` (how Gemini CLI reports a failed tool), else the object as JSON;
- ``toolConfig.functionCallingConfig.mode``: AUTO / VALIDATED -> auto, NONE -> none, ANY ->
  required (one ``allowedFunctionNames`` entry: that function; several: only those offered).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response, StreamingResponse

from .completions import CompletionRequest, CompletionResult, ReasoningDelta
from .engines.base import SamplingParams
from .errors import InvalidRequest, NotFound
from .gemini_schema import Content, CountTokensRequest, GenerateContentRequest, Part
from .http_streams import SSE_KEEPALIVE, ending_with_error_event, until_disconnected, with_keepalives
from .json_wire import JSONResponse, sse_event
from .rendering import ChatMessage
from .request_log import CLIENT_CLOSED_REQUEST
from .tool_parsers import TextDelta, ToolCallArgsDelta, ToolCallStart
from .tool_schemas import check_chosen_tool, check_function_tools

router = APIRouter()

DEFAULT_MAX_OUTPUT_TOKENS = 1024
_FINISH_REASONS = {"length": "MAX_TOKENS"}  # stop and tool_calls are both STOP in Gemini
ModelName = Annotated[str, Path(description="the model, as in models/{model}")]


# --- request -> the gateway's chat form ------------------------------------------------------


def normalise_contents(body: GenerateContentRequest) -> list[ChatMessage]:
    """systemInstruction + contents -> the gateway's chat messages; refuses what the model cannot take."""
    out: list[ChatMessage] = []
    if body.system_instruction is not None:
        system = "\n".join(_text_of(part, "systemInstruction.parts") for part in body.system_instruction.parts)
        if system:
            out.append({"role": "system", "content": system})
    unanswered: list[tuple[str, str]] = []  # (call id, function name) of the calls not yet answered
    for i, content in enumerate(body.contents):
        out.extend(_normalise(content, i, unanswered))
    return out


def _text_of(part: Part, where: str) -> str:
    if part.text is None or part.function_call is not None or part.function_response is not None:
        raise InvalidRequest(f"{where}: only text parts are allowed here")
    return part.text


def _normalise(content: Content, index: int, unanswered: list[tuple[str, str]]) -> list[ChatMessage]:
    where = f"contents[{index}]"
    texts, reasoning, calls, results = [], [], [], []
    for j, part in enumerate(content.parts):
        if part.function_call is not None and content.role == "model":
            call = part.function_call
            call_id = call.id or f"{call.name}-{index}-{j}"
            calls.append({"id": call_id, "name": call.name, "arguments": json.dumps(call.args)})
        elif part.function_response is not None and content.role != "model":
            results.append(_tool_result(part, f"{where}.parts[{j}]", unanswered))
        elif part.text is not None and part.function_call is None and part.function_response is None:
            if part.thought and content.role == "model":
                reasoning.append(part.text)
            elif not part.thought:  # a thought in a user turn is nothing the model said: dropped
                texts.append(part.text)
        else:
            raise InvalidRequest(f"{where}.parts[{j}]: {_unsupported(part, content.role or 'user')}")
    if content.role == "model":
        item: ChatMessage = {"role": "assistant", "content": "".join(texts)}
        if calls:
            item["tool_calls"] = calls
            unanswered.extend((c["id"], c["name"]) for c in calls)
        if reasoning:
            item["reasoning"] = "".join(reasoning)
        return [item]
    if texts or not results:  # separate parts of a user turn are separate pieces of text
        results.append({"role": "user", "content": "\n".join(texts)})
    return results


_DATA_PARTS = ("inlineData", "inline_data", "fileData", "file_data", "executableCode", "executable_code",
               "codeExecutionResult", "code_execution_result")


def _unsupported(part: Part, role: str) -> str:
    if part.function_call is not None:
        return f"a functionCall part belongs in a model turn, not a {role} turn"
    if part.function_response is not None:
        return "a functionResponse part belongs in a user turn, not a model turn"
    kind = next((key for key in part.model_extra or {} if key in _DATA_PARTS), None)
    if kind is not None:
        return f"{kind} parts are not supported: this model takes text"
    return "a part needs text, functionCall or functionResponse"


def _tool_result(part: Part, where: str, unanswered: list[tuple[str, str]]) -> ChatMessage:
    response = part.function_response
    assert response is not None
    for k, (call_id, name) in enumerate(unanswered):
        if (call_id == response.id) if response.id else (name == response.name):
            del unanswered[k]
            break
    else:
        named = f"id {response.id!r}" if response.id else f"name {response.name!r}"
        raise InvalidRequest(f"{where}: functionResponse with {named} answers no earlier functionCall")
    return {"role": "tool", "tool_call_id": call_id, "content": _tool_text(response.response)}


def _tool_text(response: dict[str, Any]) -> str:
    if set(response) == {"output"} and isinstance(response["output"], str):
        return response["output"]
    if "error" in response:
        error = response["error"]
        return f"Error: {error if isinstance(error, str) else json.dumps(error)}"
    return json.dumps(response)


def json_schema(schema: Any) -> Any:
    """Google's OpenAPI-subset Schema (``"type": "OBJECT"``, ``nullable``) -> JSON Schema."""
    if isinstance(schema, list):
        return [json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: json_schema(value) if key in ("properties", "items", "anyOf", "prefixItems") else value
           for key, value in schema.items() if key != "nullable"}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: json_schema(value) for name, value in schema["properties"].items()}
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = kind.lower()
        if schema.get("nullable") is True:
            out["type"] = [out["type"], "null"]
    return out


def tools_and_choice(body: GenerateContentRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Function declarations in OpenAI function form, and the calling mode in the gateway's terms."""
    tools: list[dict[str, Any]] = []
    for tool in body.tools or ():
        for declaration in tool.function_declarations or ():
            if declaration.parameters_json_schema is not None:
                parameters = declaration.parameters_json_schema
            elif declaration.parameters is not None:
                parameters = json_schema(declaration.parameters)
            else:
                parameters = {"type": "object", "properties": {}}
            tools.append({"type": "function", "function": {"name": declaration.name,
                                                          "description": declaration.description or "",
                                                          "parameters": parameters}})
    if tools:
        check_function_tools(tools, field="tools.functionDeclarations")
    config = body.tool_config.function_calling_config if body.tool_config else None
    mode = (config.mode if config else None) or "AUTO"
    if mode == "NONE":
        return tools or None, "none"
    if mode != "ANY":
        return tools or None, "auto" if tools else None
    if not tools:
        raise InvalidRequest("functionCallingConfig mode ANY requires functionDeclarations",
                             param="toolConfig.functionCallingConfig")
    allowed = (config.allowed_function_names if config else None) or []
    for name in allowed:
        check_chosen_tool(tools, name, field="toolConfig.functionCallingConfig.allowedFunctionNames")
    if len(allowed) == 1:
        return tools, {"type": "function", "function": {"name": allowed[0]}}
    if allowed:
        tools = [tool for tool in tools if tool["function"]["name"] in allowed]
    return tools, "required"


def _enable_thinking(body: GenerateContentRequest) -> bool | None:
    thinking = body.generation_config.thinking_config if body.generation_config else None
    if thinking is None:
        return None
    if thinking.thinking_budget == 0:
        return False
    return True if thinking.include_thoughts or (thinking.thinking_budget or 0) != 0 else None


def _include_thoughts(body: GenerateContentRequest) -> bool:
    thinking = body.generation_config.thinking_config if body.generation_config else None
    return bool(thinking and thinking.include_thoughts)


async def _completion_request(body: GenerateContentRequest, model: str, request: Request) -> CompletionRequest:
    gateway = request.app.state.gateway
    config = body.generation_config
    if config is not None and (config.candidate_count or 1) > 1:
        raise InvalidRequest("candidateCount above 1 is not supported by this gateway",
                             param="generationConfig.candidateCount")
    tools, choice = tools_and_choice(body)
    requested = (config.max_output_tokens if config else None) or DEFAULT_MAX_OUTPUT_TOKENS
    return CompletionRequest(
        session=await gateway.identify(request, body, model=model),
        dialect="gemini",
        model=model,
        messages=normalise_contents(body),
        sampling=SamplingParams(
            max_tokens=gateway.settings.capped_max_tokens(requested),
            temperature=1.0 if config is None or config.temperature is None else config.temperature,
            top_p=1.0 if config is None or config.top_p is None else config.top_p,
            top_k=(config.top_k if config else None) or 0,
            seed=config.seed if config else None,
            stop=tuple((config.stop_sequences if config else None) or ()),
        ),
        tools=tools,
        tool_choice=choice,
        request_body=gateway.raw_body(request),
        enable_thinking=_enable_thinking(body),
    )


# --- routes ----------------------------------------------------------------------------------


def is_gemini_path(path: str) -> bool:
    """Whether a request path is one of this module's (so its errors are written in Google's shape)."""
    return _GEMINI_PATH.fullmatch(path) is not None


# /v1beta/... (what Gemini CLI and the JS SDK call), and /v1/models/{model}:{method} (the Python SDK's
# default); /v1/models itself is OpenAI's.
_GEMINI_PATH = re.compile(r"(?:/s/[^/]+)?(?:/v1beta/.*|/v1/models/[^/]+:[A-Za-z]+)")
VERSIONS = ("/v1beta", "/v1")


def _post(method: str):
    """Register a POST route for ``models/{model}:{method}`` under every API version Google serves."""
    def register(handler):
        for version in VERSIONS:  # described once in the OpenAPI schema: the versions are the same operation
            router.add_api_route(f"{version}/models/{{model}}:{method}", handler, methods=["POST"], tags=["gemini"],
                                 include_in_schema=version == VERSIONS[0])
        return handler
    return register


@_post("generateContent")
async def generate_content(model: ModelName, body: GenerateContentRequest, request: Request):
    gateway = request.app.state.gateway
    completion = await _completion_request(body, model, request)
    prepared = await gateway.completions.prepare(completion)
    whole = await _whole_response(request, gateway.completions.stream(prepared), body, model)
    if whole is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(whole, headers={"x-arborl-session": completion.session.id})


@_post("streamGenerateContent")
async def stream_generate_content(model: ModelName, body: GenerateContentRequest, request: Request):
    """Streams as SSE with ``?alt=sse`` (what every SDK asks for); without it, Google streams one
    JSON array of responses, which this gateway writes too, as one array at the end."""
    gateway = request.app.state.gateway
    completion = await _completion_request(body, model, request)
    prepared = await gateway.completions.prepare(completion)
    stream = gateway.completions.stream(prepared)
    headers = {"x-arborl-session": completion.session.id}
    if request.query_params.get("alt") != "sse":
        whole = await _whole_response(request, stream, body, model)
        if whole is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse([whole], headers=headers)
    events = ending_with_error_event(
        _sse(stream, model, _include_thoughts(body), gateway.settings.stream_keepalive_s),
        lambda exc: sse_event(None, exc.google_body()))
    return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})


@_post("countTokens")
async def count_tokens(model: ModelName, body: CountTokensRequest, request: Request) -> dict[str, int]:
    gateway = request.app.state.gateway
    whole = body.generate_content_request
    if whole is None:
        if not body.contents:
            raise InvalidRequest("countTokens needs contents or generateContentRequest", param="contents")
        whole = GenerateContentRequest(contents=body.contents)
    await gateway.identify(request, whole, model=model)
    tools, choice = tools_and_choice(whole)
    count = await gateway.count_prompt_tokens(normalise_contents(whole), tools, choice, _enable_thinking(whole))
    return {"totalTokens": count}


def model_resource(name: str, context_length: float) -> dict[str, Any]:
    """A served model as Google describes one (``GET /v1beta/models``); token limits where known
    (an upstream's are not)."""
    resource: dict[str, Any] = {
        "name": f"models/{name}", "baseModelId": name, "version": "arborl", "displayName": name,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"]}
    if math.isfinite(context_length):
        resource["inputTokenLimit"] = resource["outputTokenLimit"] = int(context_length)
    return resource


def _served(request: Request) -> tuple[list[str], float]:
    gateway = request.app.state.gateway
    return sorted(gateway.model_names), gateway.engine.context_length


@router.get("/v1beta/models", tags=["gemini"])
async def list_models(request: Request) -> dict[str, Any]:
    names, context = _served(request)
    return {"models": [model_resource(name, context) for name in names]}


@router.get("/v1beta/models/{model}", tags=["gemini"])
async def get_model(model: ModelName, request: Request) -> dict[str, Any]:
    names, context = _served(request)
    if model not in names:
        raise NotFound(f"models/{model} is not found; this gateway serves {names}", param="model")
    return model_resource(model, context)


# --- completion events -> Gemini responses ---------------------------------------------------


def _response_id() -> str:
    return uuid.uuid4().hex[:24]


def _usage(result: CompletionResult) -> dict[str, Any]:
    answer = result.completion_tokens - result.reasoning_tokens
    usage: dict[str, Any] = {"promptTokenCount": result.prompt_tokens, "candidatesTokenCount": answer,
                             "totalTokenCount": result.prompt_tokens + result.completion_tokens}
    if result.cached_prompt_tokens:
        usage["cachedContentTokenCount"] = result.cached_prompt_tokens
    if result.reasoning_tokens:
        usage["thoughtsTokenCount"] = result.reasoning_tokens
    return usage


def _response(parts: list[dict[str, Any]], result: CompletionResult | None, model: str, response_id: str,
              *, final: bool) -> dict[str, Any]:
    # Never an empty parts list: a client sends the turn back as it got it, and a content without
    # parts is one Google's API (and this gateway) refuses. An empty reply is one empty text part.
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts or [{"text": ""}]}, "index": 0}
    out: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": response_id}
    if final and result is not None:
        candidate["finishReason"] = _FINISH_REASONS.get(result.finish_reason, "STOP")
        out["usageMetadata"] = _usage(result)
    return out


async def _whole_response(request: Request, stream: AsyncIterator, body: GenerateContentRequest,
                          model: str) -> dict[str, Any] | None:
    """The completion as one GenerateContentResponse; None if the client went away first."""
    collected = await until_disconnected(request, _collect(stream, _include_thoughts(body)))
    if collected is None:
        return None
    parts, result = collected
    return _response(parts.content, result, model, _response_id(), final=True)


async def _collect(stream: AsyncIterator, include_thoughts: bool) -> tuple[CandidateParts, CompletionResult]:
    """A whole completion as the parts it streamed, and its result (the non-streaming response)."""
    parts = CandidateParts(include_thoughts)
    async for event in stream:
        if isinstance(event, CompletionResult):
            parts.finish()
            return parts, event
        parts.feed(event)
    raise AssertionError("the completion stream ended without a result")


class CandidateParts:
    """Completion events -> Gemini parts, in the order they were generated.

    Both responses are built by it: ``feed`` and ``finish`` return the parts a stream sends now
    (text and thought fragments as they come, a function call once its arguments are complete);
    ``content`` is the whole reply with consecutive fragments of one kind merged, which is the
    non-streamed response and what a client holds after concatenating a stream. Whitespace-only
    text is held back and put in front of the next text (dropped at the end), as for Anthropic, so
    a streamed and a non-streamed reply join to the same text.
    """

    def __init__(self, include_thoughts: bool):
        self.include_thoughts = include_thoughts
        self.content: list[dict[str, Any]] = []
        self._held = ""
        self._call: dict[str, Any] | None = None  # the function call whose arguments are streaming
        self._arguments = ""

    def feed(self, event: Any) -> list[dict[str, Any]]:
        if isinstance(event, ReasoningDelta):
            if not self.include_thoughts:
                return []
            return self._close_call() + [self._grow({"text": event.text, "thought": True})]
        if isinstance(event, TextDelta):
            text = self._held + event.text
            if not text.strip():
                self._held = text
                return []
            self._held = ""
            return self._close_call() + [self._grow({"text": text})]
        if isinstance(event, ToolCallStart):
            out = self._close_call()
            self._held = ""
            self._call, self._arguments = {"id": event.id, "name": event.name}, ""
            return out
        if isinstance(event, ToolCallArgsDelta):
            self._arguments += event.fragment
        return []

    def finish(self) -> list[dict[str, Any]]:
        self._held = ""
        return self._close_call()

    def _grow(self, fragment: dict[str, Any]) -> dict[str, Any]:
        last = self.content[-1] if self.content else None
        if last is not None and "text" in last and last.get("thought") == fragment.get("thought"):
            last["text"] += fragment["text"]
        else:
            self.content.append(dict(fragment))
        return fragment

    def _close_call(self) -> list[dict[str, Any]]:
        if self._call is None:
            return []
        part = {"functionCall": {**self._call, "args": json.loads(self._arguments or "{}")}}
        self._call = None
        self.content.append(part)
        return [part]


async def _sse(stream: AsyncIterator, model: str, include_thoughts: bool, keepalive_s: float) -> AsyncIterator[bytes]:
    response_id = _response_id()
    parts = CandidateParts(include_thoughts)
    async for event in with_keepalives(stream, keepalive_s):
        if event is None:  # nothing for a while (a long prefill): an SSE comment keeps the client waiting
            yield SSE_KEEPALIVE
            continue
        if isinstance(event, CompletionResult):
            yield sse_event(None, _response(parts.finish(), event, model, response_id, final=True))
            return
        if new := parts.feed(event):
            yield sse_event(None, _response(new, None, model, response_id, final=False))
