"""Awaiting a completion on behalf of an HTTP client that may leave early (shared by the dialects)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from .completions import CompletionResult

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
