"""One completion, dialect-independent: render, stitch, generate, parse, record.

Dialects (Chat Completions here; Messages and Responses alike) normalise their request into a
``CompletionRequest``, iterate ``CompletionService.stream`` and format what comes out. The
stream yields text, reasoning and tool-call events as the tokens arrive and ends with a
``CompletionResult``; by the time that result is yielded the call is durably in the store, so
a response delivered to a client is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from arborl.rollout.records import CallRecord
from arborl.rollout.store import StoreUnavailable, TrajectoryStore

from .engines.base import Engine, EngineError, Finished, PromptTooLong, SampledToken, SamplingParams
from .errors import ContextLengthExceeded, EngineUnavailable, Overloaded
from .metrics import GatewayMetrics
from .reasoning import ReasoningStreamer, reasoning_token_count
from .rendering import ChatMessage, ChatRenderer, ConversationPrompt, RenderedPrompt
from .request_log import note_call
from .sessions import SessionIdentity
from .stitching import PromptPlan, Stitcher
from .tool_parsers import MalformedToolCall, TextDelta, ToolCall, ToolCallArgsDelta, ToolCallStart

RETRY_AFTER_SECONDS = 1

ToolChoice = Literal["none", "auto", "required"] | dict[str, Any] | None


@dataclass
class CompletionRequest:
    session: SessionIdentity
    dialect: str
    model: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = None
    request_body: str = ""
    enable_thinking: bool | None = None  # None: the template's default


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class CompletionResult:
    call_id: str
    content: str
    reasoning: str | None
    tool_calls: list[ToolCall]
    finish_reason: str  # stop | length | tool_calls
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    matched_stop: str | int | None = None
    reasoning_tokens: int = 0  # of completion_tokens, those spent on reasoning


CompletionEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | TokenLogprob | CompletionResult


@dataclass
class PreparedPrompt:
    request: CompletionRequest
    plan: PromptPlan
    forced_prefix: str
    starts_in_reasoning: bool
    opened: list[Any] = field(default_factory=list)  # engine calls already under way, one per stream


class CompletionService:
    def __init__(
        self,
        engine: Engine,
        renderer: ChatRenderer,
        store: TrajectoryStore,
        metrics: GatewayMetrics,
        *,
        max_waiting: int = 256,
    ):
        self.engine = engine
        self.renderer = renderer
        self.store = store
        self.stitcher = Stitcher(store, renderer)
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.paused = False  # an operator paused serving: new requests are refused, running ones finish

    async def prepare(self, request: CompletionRequest, *, streams: int = 1) -> PreparedPrompt:
        """Render and stitch the prompt; refuse it if the engine's queue is full or it does not fit.

        Everything that can refuse a request happens here, before the client's response starts,
        so a refusal is an HTTP status even for a streaming request.

        Backpressure: when ``max_waiting`` requests already wait for an engine slot, new ones are
        refused at once (429 / 529 with Retry-After) instead of piling up without bound.

        Rendering, tokenising and reading the session's history run in a worker thread: a
        prompt of megabytes takes seconds to tokenise, and on the event loop that would stall
        every other session's stream (and /healthz) for as long.
        """
        refuse_when_paused(self.paused)
        refuse_when_full(self.engine.stats().waiting, self.max_waiting, self.metrics)
        rendered, plan = await asyncio.to_thread(self._render_and_stitch, request)
        if rendered.forced_call is not None:  # tool_choice forces a call: the engine keeps it well-formed
            request = replace(request, sampling=replace(request.sampling, forced_call=rendered.forced_call))
        return PreparedPrompt(request, plan, rendered.forced_prefix, rendered.starts_in_reasoning)

    def _render_and_stitch(self, request: CompletionRequest) -> tuple[RenderedPrompt, PromptPlan]:
        self.store.ensure_session(request.session.id, identified_by=request.session.identified_by)
        prompt = ConversationPrompt(self.renderer, request.messages, request.tools, tool_choice=request.tool_choice,
                                    enable_thinking=request.enable_thinking)
        context = self.engine.context_length
        try:  # far too long to be worth tokenising is refused unread: it cannot fit, whatever it says
            plan = self.stitcher.plan(request.session.id, prompt, context_length=context)
        except ContextLengthExceeded:
            self.store.record_refusal(request.session.id, "context_length")
            raise
        if len(plan.prompt_ids) >= context:
            self.store.record_refusal(request.session.id, "context_length")
            raise ContextLengthExceeded(len(plan.prompt_ids), context)
        return prompt.ending, plan

    async def stream(self, prepared: PreparedPrompt, *, want_logprobs: bool = False) -> AsyncIterator[CompletionEvent]:
        request, plan = prepared.request, prepared.plan
        call = CallRecord(
            id="call-" + uuid.uuid4().hex,
            session_id=request.session.id,
            dialect=request.dialect,
            model=request.model,
            prompt_ids=plan.prompt_ids,
            completion_ids=[],
            completion_logprobs=[],
            completion_versions=[],
            messages=request.messages,
            tools=request.tools,
            request_body=request.request_body,
            token_exact=True,
            stitched_from=plan.stitched_from,
            branch_reason=plan.branch_reason,
            purpose=request.session.purpose,
        )
        parse = _OutputParser(self.renderer, prepared, self.metrics)
        logprobs: list[TokenLogprob] = []
        finished: Finished | None = None
        last_token_at = None
        self.metrics.touch_session(request.session.id)
        try:
            try:
                tokens = self.engine.generate(plan.prompt_ids, request.sampling, cache_key=request.session.id)
            except PromptTooLong as exc:
                raise ContextLengthExceeded(exc.prompt_tokens, exc.context_length) from exc
            # aclosing: a client that goes away closes this stream, which cancels the generation now.
            async with contextlib.aclosing(tokens):
                async for event in tokens:
                    now = time.time()
                    if isinstance(event, Finished):
                        finished = event
                        for item in parse.feed(event.text) + parse.finish():
                            yield item
                        break
                    if last_token_at is None:
                        call.first_token_at = now
                        self.metrics.ttft.observe(now - call.created_at)
                    else:
                        self.metrics.itl.observe(now - last_token_at)
                    last_token_at = now
                    call.completion_ids.append(event.token_id)
                    call.completion_logprobs.append(event.logprob)
                    call.completion_versions.append(event.version)
                    if want_logprobs:
                        logprobs.append(self._token_logprob(event))
                        yield logprobs[-1]
                    for item in parse.feed(event.text):
                        yield item
            assert finished is not None, "the engine stream ended without Finished"
            result = parse.result(call.id, finished, len(call.completion_ids), logprobs, call.completion_versions)
            if result.reasoning is not None:
                result.reasoning_tokens = reasoning_token_count(self.renderer.tokenizer.decode, call.completion_ids)
            call.status, call.finish_reason = "ok", finished.reason
            call.response_message = result_message(result)
            call.tool_calls = call.response_message.get("tool_calls")
            call.response_body = json.dumps(call.response_message)
            await self._record(call, plan)
            self.metrics.stitched_tokens.inc(plan.stitched_tokens)
            self.metrics.prompt_tokens.inc(len(call.prompt_ids))
            self.metrics.completion_tokens.inc(len(call.completion_ids))
            yield result
        except EngineError as exc:
            call.error = f"EngineError: {exc}"
            # Retry-After: a replica taken out, a server restarting or a swap finishing is seconds away
            raise EngineUnavailable(f"the engine failed this request: {exc}",
                                    headers={"retry-after": str(RETRY_AFTER_SECONDS)}) from exc
        except Exception as exc:
            call.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if call.finished_at is None:  # cancelled (client went away) or failed: keep what was sampled
                call.status = "cancelled" if call.error is None else "error"
                call.finish_reason = "abort"
                await self._record(call, plan)

    async def _record(self, call: CallRecord, plan: PromptPlan) -> None:
        await record_call(self.store, self.metrics, call, then=lambda: self.stitcher.remember(call, plan))

    def _token_logprob(self, event: SampledToken) -> TokenLogprob:
        decode = self.renderer.tokenizer.decode
        top = tuple((decode([tid]), lp) for tid, lp in event.top_logprobs)
        return TokenLogprob(event.token_id, decode([event.token_id]), event.logprob, top)


def refuse_when_paused(paused: bool) -> None:
    """An operator paused serving (``arborl ops pause-serving``): 503 / 529 with Retry-After."""
    if paused:
        raise EngineUnavailable("serving is paused by an operator; retry later",
                                headers={"retry-after": str(RETRY_AFTER_SECONDS)})


def refuse_when_full(waiting: int, max_waiting: int, metrics: GatewayMetrics) -> None:
    """Backpressure, for every engine: a full queue refuses at once (429 / 529 with Retry-After)."""
    if waiting >= max_waiting:
        metrics.rejected.inc()
        raise Overloaded(
            f"the engine's queue is full ({max_waiting} requests waiting); retry shortly",
            headers={"retry-after": str(RETRY_AFTER_SECONDS)},
        )


async def record_call(store: TrajectoryStore, metrics: GatewayMetrics, call: CallRecord,
                      then: Callable[[], None] | None = None) -> None:
    """Finish the call's record, commit it durably, count it, then run ``then`` (every engine records
    this way).

    The commit runs in a worker thread: it waits on the disk or the database, which on the event
    loop would stall every other stream. It is shielded: a stream cancelled while its call is
    being written still finishes the write (a thread cannot be cancelled anyway). The call counts
    towards its request's log line at once, since a cancelled request may be logged before the
    commit ends."""
    call.finished_at = time.time()
    note_call(call)

    def commit() -> None:
        started = time.perf_counter()
        try:
            store.record_call(call)
        except StoreUnavailable:
            metrics.calls_unrecorded.inc()
            raise
        metrics.record_duration.observe(time.perf_counter() - started)
        metrics.calls_recorded.labels(call.status).inc()
        if call.purpose != "main":
            metrics.auxiliary_calls.labels(call.purpose).inc()
        if call.branch_reason:
            metrics.prefix_breaks.labels(call.branch_reason).inc()
        if then is not None:
            then()

    await asyncio.shield(asyncio.to_thread(commit))


def result_message(result: CompletionResult) -> ChatMessage:
    """The assistant message a client will send back next turn, in normalised form."""
    message: ChatMessage = {"role": "assistant", "content": result.content}
    if result.tool_calls:
        message["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in result.tool_calls]
    if result.reasoning:
        message["reasoning"] = result.reasoning
    return message


class _OutputParser:
    """Generated text -> reasoning / content / tool-call events, incrementally."""

    def __init__(self, renderer: ChatRenderer, prepared: PreparedPrompt, metrics: GatewayMetrics):
        self.metrics = metrics
        self.parser_name = renderer.tool_parser.name
        self.reasoning = ReasoningStreamer(starts_in_reasoning=prepared.starts_in_reasoning)
        request = prepared.request
        self.tools = renderer.tool_parser.streamer() if request.tools and request.tool_choice != "none" else None
        self.content: list[str] = []
        self.reasoning_text: list[str] | None = [] if prepared.starts_in_reasoning else None
        self.calls: dict[int, list] = {}
        self.pending_prefix = prepared.forced_prefix

    def feed(self, text: str) -> list[CompletionEvent]:
        if self.pending_prefix:
            text, self.pending_prefix = self.pending_prefix + text, ""
        if not text:
            return []
        return self._route(self.reasoning.feed(text))

    def finish(self) -> list[CompletionEvent]:
        events = self._route(self.reasoning.finish())
        if self.tools is not None:
            events += self._content_events(self.tools.finish())
        return events

    def _route(self, pieces: list[tuple[str, str]]) -> list[CompletionEvent]:
        events: list[CompletionEvent] = []
        for kind, text in pieces:
            if kind == "reasoning":
                if self.reasoning_text is None:
                    self.reasoning_text = []
                self.reasoning_text.append(text)
                events.append(ReasoningDelta(text))
            elif self.tools is None:
                self.content.append(text)
                events.append(TextDelta(text))
            else:
                events += self._content_events(self.tools.feed(text))
        return events

    def _content_events(self, events) -> list[CompletionEvent]:
        out: list[CompletionEvent] = []
        for event in events:
            if isinstance(event, MalformedToolCall):
                self.metrics.tool_call_parse_failures.labels(self.parser_name).inc()
                continue
            if isinstance(event, TextDelta):
                self.content.append(event.text)
            elif isinstance(event, ToolCallStart):
                self.calls[event.index] = [event.id, event.name, ""]
            elif isinstance(event, ToolCallArgsDelta):
                self.calls[event.index][2] += event.fragment
            out.append(event)
        return out

    def result(self, call_id: str, finished: Finished, completion_tokens: int, logprobs, versions) -> CompletionResult:
        tool_calls = [ToolCall(i, n, a) for i, n, a in (self.calls[k] for k in sorted(self.calls))]
        finish = "length" if finished.reason == "length" else "tool_calls" if tool_calls else "stop"
        return CompletionResult(
            call_id=call_id,
            content="".join(self.content),
            reasoning="".join(self.reasoning_text) if self.reasoning_text is not None else None,
            tool_calls=tool_calls,
            finish_reason=finish,
            prompt_tokens=finished.prompt_tokens,
            cached_prompt_tokens=finished.cached_prompt_tokens,
            completion_tokens=completion_tokens,
            logprobs=logprobs,
            versions=list(versions),
            matched_stop=finished.matched_stop,
        )
