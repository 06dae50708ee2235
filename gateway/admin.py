"""Admin routes (the admin token): the served policy version, publishing new weights, and what
a rollout worker asks of the gateway (a session key per rollout, the calls a rollout made).

A learner in another process writes a checkpoint (safetensors) and calls ``POST
/admin/weights``; the engine swaps it in between two decode steps, so no request fails and
every token records the version that produced it. Versions only increase (a rollback is an
older checkpoint published under a new version).

A rollout worker on another machine needs only the gateway's URL and an admin key: ``POST
/admin/sessions/{id}/key`` issues the key its agent calls with (which records into that session
only), and ``GET /admin/sessions/{id}/calls`` counts the calls recorded for it so far (its
sub-sessions too), from any gateway that shares the store.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from .engines.base import EngineError, FromPath, ServingEngine
from .errors import Conflict, Forbidden, InvalidRequest, Unauthorized
from .sessions import check_session_id

MAX_VERSION = (1 << 63) - 1  # versions are 64-bit integers in the store


class PublishRequest(BaseModel):
    path: str = Field(description="a safetensors file, or a folder of them (Hugging Face layout)")
    version: int = Field(ge=1, le=MAX_VERSION, description="the new policy version; must exceed the served one")


def admin_name(request: Request) -> str:
    """Who is calling: ``admin`` for ``gateway.admin_token``, the key's name for one of
    ``gateway.admin_keys``; refuses anyone else. Operator actions are logged under this name."""
    gateway = request.app.state.gateway
    keys = dict(gateway.settings.admin_keys)
    if gateway.settings.admin_token:
        keys.setdefault("admin", gateway.settings.admin_token)
    if not keys:
        raise Forbidden("admin routes are off: set gateway.admin_token to use them")
    given = (gateway.api_key(request) or "").encode()
    caller = None
    for name, key in keys.items():  # every key compared, in constant time: no early exit tells which
        if secrets.compare_digest(given, key.encode()) and given:
            caller = name
    if caller is None:
        raise Unauthorized("admin routes need an admin key (Authorization: Bearer TOKEN)")
    return caller


# Every admin route checks the key first, as a dependency: FastAPI runs it before it validates the
# body, so a caller without a key learns nothing about what the routes accept.
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_name)])


def _check_admin(request: Request) -> Any:
    return request.app.state.gateway


@router.get("/policy")
async def policy(request: Request) -> dict[str, Any]:
    gateway = _check_admin(request)
    return {"model": gateway.engine.model_name, "version": gateway.engine.stats().policy_version}


@router.post("/weights")
async def publish(body: PublishRequest, request: Request) -> dict[str, Any]:
    gateway = _check_admin(request)
    engine = gateway.engine
    if FromPath not in engine.weight_updates:
        raise InvalidRequest(f"this engine takes no checkpoint folders ({_updates_taken(engine)})")
    pin = gateway.controls.serving_pin
    if pin is not None:
        raise Conflict(f"serving is pinned at version {pin} by a rollback; promote a version to publish again")
    current = engine.stats().policy_version
    if body.version <= current:
        raise InvalidRequest(f"version {body.version} must exceed the served version {current}", param="version")
    if not Path(body.path).exists():
        raise InvalidRequest(f"no checkpoint at {body.path}", param="path")
    started = time.perf_counter()
    try:
        await engine.load_weights(FromPath(Path(body.path), body.version))
    except EngineError as exc:
        raise InvalidRequest(str(exc), param="path") from exc
    return {"version": body.version, "publish_seconds": time.perf_counter() - started}


def _updates_taken(engine: ServingEngine) -> str:
    kinds = [kind.__name__ for kind in engine.weight_updates]
    return f"it takes {', '.join(kinds)}" if kinds else "it has no weights to replace: it forwards to an upstream"


@router.post("/sessions/{session_id}/key")
async def issue_session_key(session_id: str, request: Request) -> dict[str, str]:
    """A new key that records into ``session_id`` only (an orchestrated rollout's agent calls with it)."""
    gateway = _check_admin(request)
    check_session_id(session_id, "the path")
    key = await asyncio.to_thread(gateway.store.issue_session_key, session_id)
    return {"session_id": session_id, "api_key": key}


@router.get("/sessions/{session_id}/calls")
async def session_calls(session_id: str, request: Request) -> dict[str, Any]:
    """The calls recorded for the session and its sub-sessions so far (``CallStats``)."""
    gateway = _check_admin(request)
    check_session_id(session_id, "the path")
    stats = await asyncio.to_thread(gateway.ledger.call_stats, session_id)
    return {"session_id": session_id, **asdict(stats)}
