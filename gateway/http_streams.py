"""Serving a completion to an HTTP client that may leave early or see it fail (shared by the dialects)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from .completions import CompletionResult
from .errors import GatewayError, InternalError

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer

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
    except Exception:
        log.exception("a stream failed after its response started")
        yield error_event(InternalError("internal error in arborl"))
