"""The FastAPI application: routes, error handling, limits, metrics, lifecycle.

``create_app(engine, store, settings)`` is the whole public surface; the CLI and the tests
both build the gateway through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import secrets
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arborl.rollout.store import SESSION_KEY_PREFIX, RunControls, RunLedger, StoreUnavailable, TrajectoryStore
from arborl.scaffold_adapters.registry import call_purpose

from . import admin, anthropic_messages, feedback, gemini_api, openai_chat, operations, responses_api
from .completions import CompletionService
from .engines.base import Engine, ServingEngine
from .errors import (
    Forbidden,
    GatewayError,
    HTTPRefusal,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    Unauthorized,
    store_unreachable,
)
from .json_nesting import MAX_JSON_DEPTH, nesting_exceeds
from .json_wire import JSONResponse
from .metrics import GatewayMetrics
from .rendering import ChatMessage, ChatRenderer
from .request_log import RequestLog
from .sessions import SessionIdentity, check_session_id, identify_session
from .settings import GatewaySettings
from .tool_parsers import get_parser
from .upstream import UpstreamCompletions, UpstreamEngine

log = logging.getLogger(__name__)


def default_tool_parser(engine: ServingEngine) -> str:
    """The tool-call syntax a model family was trained on."""
    vocab: dict[str, int] = getattr(engine.tokenizer, "get_vocab", dict)()
    if "coder" in engine.model_name.lower() and engine.model_family.startswith("qwen3"):
        return "qwen3_coder"
    if "<|python_tag|>" in vocab:
        return "llama3_json"
    return "hermes"


class Gateway:
    """What the routes share: the engine, the store, rendering, metrics and settings."""

    def __init__(self, engine: ServingEngine, store: TrajectoryStore, settings: GatewaySettings):
        self.engine = engine
        self.store = store
        self.controls = RunControls(store)  # operator controls shared with the learner (rollout/store/controls.py)
        self.ledger = RunLedger(store)  # steps (for rollbacks) and feedback on sessions
        self.settings = settings
        self.metrics = GatewayMetrics()
        engine.observer = self.metrics
        parser = get_parser(settings.tool_parser or default_tool_parser(engine))
        # Without a tokenizer an upstream's calls are recorded as text only.
        self.renderer = ChatRenderer(engine.tokenizer, parser) if engine.tokenizer is not None else None
        self.completions: CompletionService | UpstreamCompletions
        if engine.serves == "messages":  # forwarded whole: the upstream renders its own prompt
            self.completions = UpstreamCompletions(
                cast(UpstreamEngine, engine), self.renderer, store, self.metrics, max_waiting=settings.max_waiting)
        else:  # rendered, stitched and sampled from token ids: every token recorded as sampled
            if self.renderer is None:
                raise ValueError(f"engine {engine.model_name} serves token ids but has no tokenizer")
            self.completions = CompletionService(
                cast(Engine, engine), self.renderer, store, self.metrics, max_waiting=settings.max_waiting)
        self.model_names = {engine.model_name, *settings.model_aliases}
        # On loopback only local processes can reach the gateway; anywhere else a key is required
        # (with no keys configured, nothing gets in but session keys arborl issued).
        self.keys_required = bool(settings.api_keys) or not _is_loopback(settings.host)
        if self.keys_required and not settings.api_keys:
            log.warning("gateway binds to %s with no api_keys configured: only session keys are accepted",
                        settings.host)

    def api_key(self, request: Request) -> str | None:
        """The key as each dialect sends it: ``Authorization: Bearer`` (OpenAI), ``x-api-key``
        (Anthropic), ``x-goog-api-key`` or, on Gemini routes only, ``?key=`` (Google)."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        key = request.headers.get("x-api-key") or request.headers.get("x-goog-api-key")
        if not key and dialect_of(request) == "gemini":
            key = request.query_params.get("key")
        return key or None

    async def identify(self, request: Request, body: Any, *, model: str | None = None) -> SessionIdentity:
        """Check the key and the model name (``model``, else ``body.model``); say which session the
        request belongs to.

        A session key arborl issued records into its own session only (and that session's
        auxiliary tries): naming another one by path or header is refused with a 403. A key not
        seen before is looked up in the store in a worker thread (the store may be slow, or away).
        """
        key = self.api_key(request)
        own_session = None
        if key is not None and key.startswith(SESSION_KEY_PREFIX):
            own_session = await asyncio.to_thread(self.store.session_for_key, key)
        if self.keys_required and own_session is None and not is_configured_key(key, self.settings.api_keys):
            raise Unauthorized("a valid API key is required (Authorization: Bearer KEY or x-api-key: KEY)")
        model = body.model if model is None else model  # Gemini names the model in the path
        if model not in self.model_names and not self.settings.any_model_name:
            raise ModelNotFound(
                f"The model {model!r} does not exist; this gateway serves {sorted(self.model_names)}",
                param="model",
            )
        session = identify_session(
            path_session=request.path_params.get("session_id"),
            headers=request.headers,
            api_key=key,
            body=body.model_dump(include={"metadata", "client_metadata"}),
            session_for_key=lambda _key: own_session,
        )
        if own_session is not None and session.id != own_session:
            raise Forbidden("this API key was issued for another session: a session key records into its own "
                            "session only", param="session")
        purpose = call_purpose(request.headers, _LazyJson(request.scope.get("arborl.raw_body", b"")))
        return session.for_purpose(purpose.kind, purpose.branch)

    async def count_prompt_tokens(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None,
                                  tool_choice: Any, enable_thinking: bool | None) -> int:
        """The prompt's length in tokens as it would be rendered (the dialects' count-tokens routes).

        Tokenised in a worker thread: a long conversation must not stall the event loop."""
        renderer = self.renderer
        if renderer is None:
            raise InvalidRequest("counting tokens needs a tokenizer: this gateway forwards to an upstream without "
                                 "one (set engine.tokenizer)")

        def count() -> int:
            rendered = renderer.render(messages, tools, tool_choice=tool_choice, enable_thinking=enable_thinking)
            return len(renderer.encode(rendered.text))

        return await asyncio.to_thread(count)

    @staticmethod
    def raw_body(request: Request) -> str:
        return request.scope.get("arborl.raw_body", b"").decode("utf-8", "replace")

    def refresh_gauges(self) -> None:
        stats = self.engine.stats()
        self.metrics.queue_depth.set(stats.waiting)
        self.metrics.running.set(stats.running)
        self.metrics.policy_version.set(stats.policy_version)
        self.metrics.observe_replicas(stats.replicas)
        self.metrics.trie_nodes.set(self.store.total_nodes)
        self.metrics.trie_tokens.set(self.store.total_tokens)


class _LazyJson(Mapping[str, Any]):
    """A request body parsed only if a scaffold adapter looks past the headers."""

    def __init__(self, raw: bytes):
        self._raw = raw
        self._parsed: dict[str, Any] | None = None

    def _data(self) -> dict[str, Any]:
        if self._parsed is None:
            try:
                parsed = json.loads(self._raw or b"{}")
            except ValueError:
                parsed = None
            self._parsed = parsed if isinstance(parsed, dict) else {}
        return self._parsed

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


def is_configured_key(key: str | None, keys: list[str]) -> bool:
    """Whether ``key`` is one of ``keys``, compared in constant time (no early exit on a mismatch)."""
    if not key:
        return False
    given = key.encode()
    found = False
    for candidate in keys:
        found |= secrets.compare_digest(given, candidate.encode())
    return found


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dialect_of(request: Request) -> str:
    """Whose error format a route answers in: Messages routes Anthropic's, Gemini routes Google's,
    everything else OpenAI's."""
    path = request.url.path
    if path.endswith(("/v1/messages", "/v1/messages/count_tokens")):
        return "anthropic"
    if gemini_api.is_gemini_path(path):
        return "gemini"
    return "openai"


_RETRYABLE = frozenset({429, 502, 503, 504})


def error_response(request: Request, exc: GatewayError) -> JSONResponse:
    """The error in the format of the dialect the client speaks.

    ``x-should-retry`` tells the official SDKs (and Claude Code) whether retrying can help:
    only for an overloaded, unavailable or failing engine, never for a request that is wrong.
    """
    headers = {**exc.headers, "x-should-retry": "true" if exc.status_code in _RETRYABLE else "false"}
    dialect = dialect_of(request)
    if dialect == "anthropic":
        return JSONResponse(exc.anthropic_body(), status_code=exc.anthropic_status, headers=headers)
    if dialect == "gemini":
        return JSONResponse(exc.google_body(), status_code=exc.status_code, headers=headers)
    return JSONResponse(exc.openai_body(), status_code=exc.status_code, headers=headers)


class RequestBody:
    """Read the whole body once, refuse what no parser should see, keep the raw bytes for the record.

    Refused here, in the dialect's error format: a body over ``max_bytes`` (413), and JSON nested
    deeper than ``json_nesting.MAX_JSON_DEPTH`` (400), which would otherwise reach the JSON parser,
    pydantic, jsonschema and the chat template as a RecursionError. Large bodies are checked in a
    worker thread, so one client's 30 MB body does not stall the event loop for the others.
    """

    _INLINE_BYTES = 256 << 10

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_large = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _refuse(scope, send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _refuse(scope, send, too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        too_deep = (nesting_exceeds(body) if len(body) <= self._INLINE_BYTES
                    else await asyncio.to_thread(nesting_exceeds, body))
        if too_deep:
            return await _refuse(scope, send, InvalidRequest(
                f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep "
                f"(the gateway's limit)"))
        scope["arborl.raw_body"] = body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(scope: Scope, send: Send, error: GatewayError) -> None:
    response = error_response(Request(scope), error)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class InternalErrors:
    """Any exception that is not one of the gateway's own errors: a bug in arborl, answered 500.

    Answered here, not by Starlette's outermost error middleware, because that one re-raises
    after answering and the server then drops the keep-alive connection without saying so (the
    client's next request on it fails). Here the 500 is a complete response and the connection
    stays usable. A failure after a response started (a stream) cannot change its status: the
    dialects end their streams with their own error event (``http_streams.ending_with_error_event``),
    so nothing reaches this point but the log line.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            route = getattr(scope.get("route"), "path", None)
            log.exception("unhandled error on %s", route or ascii(scope.get("path", "")))
            if started:
                raise  # the response is broken half-way: the server must close the connection
            await _refuse(scope, send, InternalError("internal error in arborl"))


_KEYED_ROUTES = (("/admin/", admin.admin_name), ("/v1/feedback", feedback.feedback_sender))


def validation_refusal(errors: list[dict[str, Any]]) -> InvalidRequest:
    """pydantic's complaints about a body -> one 400 naming the field, what is wrong, what came.

    Of several complaints the most specific (deepest) is reported: for a value that matches no
    member of a union, pydantic complains once per member, and the member the value was meant
    for goes deepest. Union members' labels in the location (``str``, ``list[...]``, the tags of
    typed items, which have a space) are left out, so the location reads as a path in the body.
    """
    first = max(errors, key=lambda error: len(error.get("loc", ())), default={})
    location = ".".join(str(part) for part in first.get("loc", ())[1:] if not _union_label(part))
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
    if not location:
        return InvalidRequest("a JSON request body is required" if first.get("type") == "missing" else message)
    message = f"{location}: {message}"
    given = first.get("input")
    if isinstance(given, str | int | float) and first.get("type") != "missing":
        shown = repr(given)
        message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return InvalidRequest(message, param=location)


def _union_label(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_LABELS or any(c in part for c in "[] "))


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def session_path(session_id: Annotated[str, Path(description="the session the call is recorded in")]) -> str:
    """The ``/s/{session_id}`` prefix: declared for OpenAPI, checked before the route runs."""
    return check_session_id(session_id, "the path")


def create_app(
    engine: ServingEngine, store: TrajectoryStore, settings: GatewaySettings | None = None
) -> FastAPI:
    settings = settings or GatewaySettings()
    gateway = Gateway(engine, store, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="arborl gateway", version="0.1.0", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StoreUnavailable)
    async def store_error(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return error_response(request, store_unreachable())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The key dependencies of admin and feedback routes run before the body is validated, but
        # FastAPI parses JSON before any dependency: a caller without a key learns nothing of the body.
        for prefix, check_key in _KEYED_ROUTES:
            if request.url.path.startswith(prefix):
                check_key(request)
        return error_response(request, validation_refusal(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown route, wrong method, unreadable body)."""
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body is not valid UTF-8 JSON"
        error = HTTPRefusal(detail, headers=getattr(exc, "headers", None) or {})
        error.status_code = exc.status_code
        error.error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, error)

    # Outermost last: metrics see every answer, the 500s of InternalErrors included.
    app.add_middleware(RequestBody, max_bytes=settings.max_body_bytes)
    app.add_middleware(InternalErrors)
    app.add_middleware(RequestLog, metrics=gateway.metrics)

    # Under /s/{session_id} every route also declares (and checks) the session id path parameter,
    # so the OpenAPI schema describes those operations completely.
    in_session: dict[str, Any] = {"prefix": "/s/{session_id}", "dependencies": [Depends(session_path)]}
    for dialect in (openai_chat.router, anthropic_messages.router, responses_api.router, gemini_api.router):
        app.include_router(dialect)
        app.include_router(dialect, **in_session)

    meta = APIRouter()

    @meta.get("/v1/models", tags=["openai"])
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "arborl"}
                for name in sorted(gateway.model_names)
            ],
        }

    app.include_router(meta)
    app.include_router(meta, **in_session)
    app.include_router(admin.router)
    app.include_router(operations.router)
    app.include_router(feedback.router)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> dict[str, str]:
        """Agents probe the base URL on start (Claude Code sends HEAD /)."""
        return {"service": "arborl", "model": engine.model_name}

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        stats = engine.stats()
        ready = engine.healthy
        return JSONResponse(
            {"ready": ready, "model": engine.model_name, "policy_version": stats.policy_version,
             "waiting": stats.waiting, "running": stats.running,
             **({"replicas": [dataclasses.asdict(r) for r in stats.replicas]} if stats.replicas else {})},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(gateway.metrics.render(gateway.refresh_gauges), media_type="text/plain; version=0.0.4")

    return app
