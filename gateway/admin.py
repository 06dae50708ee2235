"""Admin routes (the admin token): the served policy version, and publishing new weights.

A learner in another process writes a checkpoint (safetensors) and calls ``POST
/admin/weights``; the engine swaps it in between two decode steps, so no request fails and
every token records the version that produced it. Versions only increase (a rollback is an
older checkpoint published under a new version).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .engines.base import EngineError
from .errors import Forbidden, InvalidRequest, Unauthorized

router = APIRouter(prefix="/admin", tags=["admin"])


class PublishRequest(BaseModel):
    path: str = Field(description="a safetensors file, or a folder of them (Hugging Face layout)")
    version: int = Field(ge=1, description="the new policy version; must exceed the served one")


def _check_admin(request: Request) -> Any:
    gateway = request.app.state.gateway
    token = gateway.settings.admin_token
    if not token:
        raise Forbidden("admin routes are off: set gateway.admin_token to use them")
    if not secrets.compare_digest((gateway.api_key(request) or "").encode(), token.encode()):
        raise Unauthorized("admin routes need the admin token (Authorization: Bearer TOKEN)")
    return gateway


@router.get("/policy")
async def policy(request: Request) -> dict[str, Any]:
    gateway = _check_admin(request)
    return {"model": gateway.engine.model_name, "version": gateway.engine.stats().policy_version}


@router.post("/weights")
async def publish(body: PublishRequest, request: Request) -> dict[str, Any]:
    gateway = _check_admin(request)
    engine = gateway.engine
    if not hasattr(engine, "load_weights"):
        raise InvalidRequest("this engine has no weights to replace (it forwards to an upstream)")
    current = engine.stats().policy_version
    if body.version <= current:
        raise InvalidRequest(f"version {body.version} must exceed the served version {current}", param="version")
    if not Path(body.path).exists():
        raise InvalidRequest(f"no checkpoint at {body.path}", param="path")
    started = time.perf_counter()
    try:
        await engine.load_weights(body.path, body.version)
    except EngineError as exc:
        raise InvalidRequest(str(exc), param="path") from exc
    return {"version": body.version, "publish_seconds": time.perf_counter() - started}
