"""Serving a completion to an HTTP client that may leave early or see it fail (shared by the dialects)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from arborl.rollout.store import StoreUnavailable

from .completions import CompletionResult
from .errors import GatewayError, InternalError, store_unreachable

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25
SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: every client's event parser skips it

T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``, cancelling it if the client goes away first (then None).

    Cancelling closes the engine streams, which frees their slots and records the calls as
    cancelled with what was sampled so far.
    """
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None


async def last_result(stream: AsyncIterator) -> CompletionResult:
    """Run a completion stream to its end and return its result (non-streaming responses)."""
    result = None
    async for event in stream:
        result = event
    assert isinstance(result, CompletionResult)
    return result


async def ending_with_error_event(
    chunks: AsyncIterator[bytes], error_event: Callable[[GatewayError], bytes]
) -> AsyncIterator[bytes]:
    """A dialect's SSE stream that, if it fails after its 200, ends with the dialect's error event.

    A gateway error (the engine failed, the context overflowed mid-call) is reported as itself;
    anything else is a bug in arborl, logged, and reported as an internal error. Either way the
    client learns the stream failed, instead of seeing it stop with no ending (the completion
    service has already recorded the call with its error). A client that went away
    (cancellation) is not a failure and gets nothing.
    """
    try:
        async for chunk in chunks:
            yield chunk
    except GatewayError as exc:
        yield error_event(exc)
    except StoreUnavailable:  # the call could not be recorded: the client never saw it end
        log.warning("a stream's call could not be recorded: the store is unreachable")
        yield error_event(store_unreachable())
    except Exception:
        log.exception("a stream failed after its response started")
        yield error_event(InternalError("internal error in arborl"))


async def with_keepalives(stream: AsyncIterator[T], seconds: float) -> AsyncIterator[T | None]:
    """The stream's events, and None whenever nothing arrived for ``seconds`` (the dialect then
    sends its keep-alive: ``gateway.stream_keepalive_s``). Agents give up on a stream that stays
    silent past their read timeout, as it does during a long prefill, and then retry it. Closing
    this closes ``stream``, which cancels the generation."""
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
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
