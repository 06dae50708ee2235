"""The ``upstream`` engine: completions forwarded to another OpenAI- or Anthropic-compatible server.

For a hosted model under evaluation, a teacher or a judge. Any of the gateway's four dialects
can be forwarded: the request is normalised as for the embedded engine, sent upstream in the
upstream's own API (``upstream_wire``), and its stream is translated back event by event, so
the client sees its own dialect and streaming stays streaming.

Every call is recorded like any other, with two differences: it is marked not token-exact
(the ids, when a tokenizer is configured, are a re-tokenisation of text someone else sampled),
so training never treats it as a policy sample; and with no tokenizer it has no tokens at all.
Upstream failures become the dialect's 502 (refused, failed, broken off) or 504 (timed out),
never a hang: connect, read and write each have a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

import httpx

from arborl.rollout.records import CallRecord
from arborl.rollout.store import TrajectoryStore

from .completions import (
    CompletionEvent,
    CompletionRequest,
    CompletionResult,
    PreparedPrompt,
    record_call,
    refuse_when_full,
    refuse_when_paused,
    result_message,
)
from .engines.base import EngineObserver, EngineStats, TokenizerLike, WeightUpdate, WeightUpdateNotSupported
from .engines.event_stream import UnreadableEvent, json_events
from .errors import GatewayError, InvalidRequest, Overloaded, UpstreamFailed, UpstreamTimeout
from .metrics import GatewayMetrics
from .rendering import ChatRenderer
from .stitching import PromptPlan
from .upstream_wire import (
    StreamState,
    UpstreamApi,
    UpstreamStreamError,
    anthropic_events,
    anthropic_request,
    openai_events,
    openai_request,
)

ANTHROPIC_VERSION = "2023-06-01"


class UpstreamEngine:
    """The connection to the upstream server and what the gateway needs to know about it.

    ``url`` is the base the upstream's SDK would use: ``http://host/v1`` for an OpenAI-compatible
    server (requests go to ``{url}/chat/completions``), ``https://host`` for an Anthropic one
    (requests go to ``{url}/v1/messages``). It serves messages, not token ids, and has no
    weights to replace (``engines.base.ServingEngine``).
    """

    serves: Literal["messages"] = "messages"
    model_family = ""  # unknown: the upstream renders its own prompts
    weight_updates: tuple[type[WeightUpdate], ...] = ()
    observer: EngineObserver | None = None  # an upstream reports no per-step figures

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api: UpstreamApi = "openai",
        api_key: str | None = None,
        served_name: str | None = None,
        tokenizer: TokenizerLike | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_connections: int = 512,
    ):
        self.url = url.rstrip("/")
        self.model = model
        self.api = api
        self.model_name = served_name or model
        self.tokenizer = tokenizer
        self.context_length = math.inf  # the upstream enforces its own
        self.max_connections = max_connections
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        if api == "openai":
            self._path = "/chat/completions"
            self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        else:
            self._path = "/v1/messages"
            self._headers = {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": api_key} if api_key else {})}
        self._client: httpx.AsyncClient | None = None
        self.in_flight = 0

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                         limits=limits)

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def load_weights(self, update: WeightUpdate) -> None:
        raise WeightUpdateNotSupported("this engine has no weights to replace (it forwards to an upstream)")

    def stats(self) -> EngineStats:
        # Requests beyond the connection pool wait for a connection: that is the queue.
        return EngineStats(waiting=max(0, self.in_flight - self.max_connections), running=self.in_flight)

    @property
    def healthy(self) -> bool:
        return self._client is not None

    async def open(self, request: CompletionRequest) -> httpx.Response:
        """Send the request and wait for the upstream's status; the body is left to ``events``.

        Called before the client's response starts, so an unreachable, refusing or silent
        upstream becomes the client's 4xx/502/504 status, streaming or not.
        """
        if self._client is None:
            raise UpstreamFailed("the upstream engine is not started")
        build = openai_request if self.api == "openai" else anthropic_request
        upstream_request = self._client.build_request("POST", self._path, json=build(request, self.model))
        self.in_flight += 1
        try:
            response = await self._client.send(upstream_request, stream=True)
            if response.status_code >= 400:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                raise _refusal(response)
        except httpx.HTTPError as exc:
            self.in_flight -= 1
            raise _transport_error(exc, self.url) from exc
        except BaseException:
            self.in_flight -= 1
            raise
        return response

    async def discard(self, response: httpx.Response) -> None:
        """Give back a call ``open`` started that will not be read."""
        self.in_flight -= 1
        await response.aclose()

    async def events(self, response: httpx.Response, state: StreamState) -> AsyncGenerator[Any, None]:
        """The opened completion as gateway events; ``state`` gathers it for the record."""
        parse = openai_events if self.api == "openai" else anthropic_events
        try:
            async for payload in json_events(response):
                for event in parse(payload, state):
                    yield event
        except UnreadableEvent as exc:
            raise UpstreamFailed(f"the upstream sent {exc}") from None
        except UpstreamStreamError as exc:
            raise UpstreamFailed(f"the upstream failed the completion: {exc}") from exc
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        finally:
            self.in_flight -= 1
            await response.aclose()
        if not state.complete:
            raise UpstreamFailed("the upstream closed the stream before the completion ended")


def _transport_error(exc: httpx.HTTPError, url: str) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"the upstream at {url} did not answer in time ({type(exc).__name__})")
    return UpstreamFailed(f"could not complete the call to the upstream at {url}: {exc!r}")


def _refusal(response: httpx.Response) -> GatewayError:
    """The upstream's HTTP error as the gateway's: the client's fault stays 4xx, ours is a 502."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = response.text[:500]
    status = response.status_code
    if status == 429:
        return Overloaded(f"the upstream is rate limiting: {message}",
                          headers={"retry-after": response.headers.get("retry-after", "1")})
    if status in (400, 413, 422):
        return InvalidRequest(f"the upstream refused the request: {message}")
    # 401/403/404 mean the gateway's upstream configuration is wrong; 5xx and 529 that it failed.
    return UpstreamFailed(f"the upstream answered {status}: {message}")


class UpstreamCompletions:
    """``CompletionService``'s interface over an upstream engine: forward, translate, record."""

    def __init__(
        self,
        engine: UpstreamEngine,
        renderer: ChatRenderer | None,
        store: TrajectoryStore,
        metrics: GatewayMetrics,
        *,
        max_waiting: int = 256,
    ):
        self.engine = engine
        self.renderer = renderer
        self.store = store
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.paused = False  # an operator paused serving: new requests are refused

    async def prepare(self, request: CompletionRequest, *, streams: int = 1) -> PreparedPrompt:
        """Check the queue, then open the upstream calls (one per stream) so their failures are statuses."""
        refuse_when_paused(self.paused)
        refuse_when_full(self.engine.stats().waiting, self.max_waiting, self.metrics)
        prompt_ids = await asyncio.to_thread(self._prompt_ids, request)  # tokenising is slow: off the event loop
        prepared = PreparedPrompt(request, PromptPlan(prompt_ids), "", False)
        created = time.time()
        opened = await asyncio.gather(*(self.engine.open(request) for _ in range(streams)), return_exceptions=True)
        failure = next((r for r in opened if isinstance(r, BaseException)), None)
        if failure is not None:
            for response in opened:
                if isinstance(response, httpx.Response):
                    await self.engine.discard(response)
            await self._record_refused(request, prompt_ids, created, failure)
            raise failure
        prepared.opened = list(opened)
        return prepared

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The prompt as ids, to record the call by (none without a tokenizer)."""
        self.store.ensure_session(request.session.id, identified_by=request.session.identified_by)
        if self.renderer is None:
            return []
        rendered = self.renderer.render(request.messages, request.tools, tool_choice=request.tool_choice,
                                        enable_thinking=request.enable_thinking)
        return self.renderer.encode(rendered.text)

    async def _record_refused(self, request: CompletionRequest, prompt_ids: list[int], created: float,
                              failure: BaseException) -> None:
        """A call the upstream refused is recorded too: what was asked, and why it failed."""
        call = _call_record(request, prompt_ids)
        call.status, call.finish_reason, call.created_at = "error", "abort", created
        call.error = f"{type(failure).__name__}: {failure}"
        await self._record(call)

    async def stream(self, prepared: PreparedPrompt, *, want_logprobs: bool = False) -> AsyncIterator[CompletionEvent]:
        """The upstream's events, then the result once the call is recorded (logprobs: none to give)."""
        request = prepared.request
        call = _call_record(request, prepared.plan.prompt_ids)
        state = StreamState()
        self.metrics.touch_session(request.session.id)
        try:
            response = prepared.opened.pop() if prepared.opened else await self.engine.open(request)
            async with contextlib.aclosing(self.engine.events(response, state)) as events:
                async for event in events:
                    if call.first_token_at is None:
                        call.first_token_at = time.time()
                        self.metrics.ttft.observe(call.first_token_at - call.created_at)
                    yield event
            done = state.done
            assert done is not None
            result = CompletionResult(
                call_id=call.id, content="".join(state.content), reasoning="".join(state.reasoning) or None,
                tool_calls=state.calls(), finish_reason=done.finish_reason, prompt_tokens=done.prompt_tokens,
                cached_prompt_tokens=done.cached_prompt_tokens, completion_tokens=done.completion_tokens,
                matched_stop=done.matched_stop, reasoning_tokens=done.reasoning_tokens,
            )
            call.status, call.finish_reason = "ok", done.finish_reason
            call.response_message = result_message(result)
            call.tool_calls = call.response_message.get("tool_calls")
            call.response_body = json.dumps(call.response_message)
            self._tokenise_completion(call, result)
            await self._record(call)
            self.metrics.prompt_tokens.inc(done.prompt_tokens)
            self.metrics.completion_tokens.inc(done.completion_tokens)
            yield result
        except Exception as exc:
            call.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if call.finished_at is None:
                call.status = "cancelled" if call.error is None else "error"
                call.finish_reason = "abort"
                call.response_body = json.dumps({"content": "".join(state.content)})
                await self._record(call)

    def _tokenise_completion(self, call: CallRecord, result: CompletionResult) -> None:
        """With a tokenizer: the reply's text as ids, so the call shows in its trie (never trained on)."""
        if self.renderer is None or not call.prompt_ids:
            return
        text = result.content + "".join(self.renderer.tool_parser.format_call(c.name, _arguments(c.arguments))
                                        for c in result.tool_calls)
        call.completion_ids = self.renderer.encode(text) if text else []
        call.completion_logprobs = [math.nan] * len(call.completion_ids)  # unknown: sampled elsewhere
        call.completion_versions = [-1] * len(call.completion_ids)  # not a policy version

    async def _record(self, call: CallRecord) -> None:
        await record_call(self.store, self.metrics, call)


def _call_record(request: CompletionRequest, prompt_ids: list[int]) -> CallRecord:
    """A new record of a forwarded call: never token-exact, completion filled in as it streams."""
    return CallRecord(
        id="call-" + uuid.uuid4().hex, session_id=request.session.id, dialect=request.dialect,
        model=request.model, prompt_ids=prompt_ids, completion_ids=[], completion_logprobs=[],
        completion_versions=[], messages=request.messages, tools=request.tools,
        request_body=request.request_body, token_exact=False, purpose=request.session.purpose,
    )


def _arguments(text: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text)
    except ValueError:
        return {"_unparsed": text}
    return arguments if isinstance(arguments, dict) else {"_value": arguments}
