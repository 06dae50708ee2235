"""Operator actions on a running run (admin keys only; ``arborl ops`` is their command line).

    POST /admin/training/pause | /admin/training/resume     the learner takes no step while paused
    POST /admin/learner            {"lr": 1e-6, "max_staleness": 2}: applied from the next step
    POST /admin/serving/pause      {"drain": true}: refuse new requests (503 / 529), let running ones
                                   finish; with drain, answer once none is running
    POST /admin/serving/resume
    POST /admin/rollback           {"version": 3}: serve that committed checkpoint again, and pin
                                   serving there (the learner trains on but does not publish)
    POST /admin/promote            {"version": 5} or {}: serve that version (default: the learner's
                                   newest), unpin, and keep its checkpoint for good
    GET  /admin/actions            the audit log: when, who (the admin key's name), what

Training controls live in the run's store (``rollout/store/controls.py``), so the learner, in its
own process, sees them; serving controls act on this gateway's engine directly. Every action is
logged with the caller's admin key name, in the same transaction as the control it changes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from arborl.rollout.store import KEPT_VERSIONS, LEARNER_OVERRIDES, SERVING_PIN, TRAINING_PAUSED

from .admin import MAX_VERSION, admin_name
from .engines.base import EngineError, FromPath
from .errors import InvalidRequest, NotFound

# The admin key is checked before anything else, the body included (see admin.router).
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_name)])


class LearnerUpdate(BaseModel):
    lr: float | None = Field(default=None, gt=0, description="the learning rate from the next step on")
    max_staleness: int | None = Field(default=None, ge=0, description="versions a group may lag and still train")


class ServingPause(BaseModel):
    drain: bool = Field(default=False, description="answer once no request is running")
    timeout_s: float = Field(default=300.0, gt=0, le=3600)


class VersionChoice(BaseModel):
    version: int | None = Field(default=None, ge=0, le=MAX_VERSION)


def _act(request: Request, action: str, details: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    who = admin_name(request)
    record = request.app.state.gateway.controls.act(who, action, details, changes)
    return asdict(record)


@router.post("/training/pause")
async def pause_training(request: Request) -> dict[str, Any]:
    return _act(request, "pause_training", {}, {TRAINING_PAUSED: True})


@router.post("/training/resume")
async def resume_training(request: Request) -> dict[str, Any]:
    return _act(request, "resume_training", {}, {TRAINING_PAUSED: False})


@router.post("/learner")
async def set_learner(body: LearnerUpdate, request: Request) -> dict[str, Any]:
    update = body.model_dump(exclude_none=True)
    if not update:
        raise InvalidRequest("give lr and/or max_staleness")
    overrides = {**request.app.state.gateway.controls.learner_overrides, **update}
    return _act(request, "set_learner", update, {LEARNER_OVERRIDES: overrides})


@router.post("/serving/pause")
async def pause_serving(body: ServingPause, request: Request) -> dict[str, Any]:
    gateway = request.app.state.gateway
    gateway.completions.paused = True
    record = _act(request, "pause_serving", body.model_dump(), {})
    running = gateway.engine.stats().running
    if body.drain:
        deadline = time.monotonic() + body.timeout_s
        while running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            running = gateway.engine.stats().running
    return {**record, "running": running, "drained": running == 0}


@router.post("/serving/resume")
async def resume_serving(request: Request) -> dict[str, Any]:
    request.app.state.gateway.completions.paused = False
    return _act(request, "resume_serving", {}, {})


def _checkpoint(request: Request, version: int) -> Path:
    """The committed checkpoint of ``version`` (version 0: the base weights are not a checkpoint)."""
    steps = [s for s in request.app.state.gateway.ledger.steps() if s.version == version]
    if not steps:
        raise NotFound(f"no committed step has version {version}")
    path = Path(steps[-1].checkpoint)
    if not path.exists():
        raise InvalidRequest(f"the checkpoint of version {version} was pruned ({path}); keep more with "
                             "learner.keep_checkpoints, or promote versions you may return to", param="version")
    return path


async def _serve(request: Request, version: int) -> float:
    engine = request.app.state.gateway.engine
    if FromPath not in engine.weight_updates:
        raise InvalidRequest("this engine takes no checkpoint folders, so it cannot serve another version")
    path = _checkpoint(request, version)
    started = time.perf_counter()
    try:
        await engine.load_weights(FromPath(path, version))
    except EngineError as exc:
        raise InvalidRequest(str(exc), param="version") from exc
    return time.perf_counter() - started


@router.post("/rollback")
async def rollback(body: VersionChoice, request: Request) -> dict[str, Any]:
    if body.version is None:
        raise InvalidRequest("give the version to roll back to", param="version")
    seconds = await _serve(request, body.version)
    controls = request.app.state.gateway.controls
    kept = sorted(controls.kept_versions | {body.version})
    record = _act(request, "rollback", {"version": body.version}, {SERVING_PIN: body.version, KEPT_VERSIONS: kept})
    return {**record, "version": body.version, "swap_seconds": seconds}


@router.post("/promote")
async def promote(body: VersionChoice, request: Request) -> dict[str, Any]:
    gateway = request.app.state.gateway
    version = body.version
    if version is None:
        last = gateway.ledger.last_step()
        if last is None:
            raise InvalidRequest("no version has been trained yet", param="version")
        version = last.version
    seconds = 0.0
    if version != gateway.engine.stats().policy_version:
        seconds = await _serve(request, version)
    kept = sorted(gateway.controls.kept_versions | {version})
    record = _act(request, "promote", {"version": version}, {SERVING_PIN: None, KEPT_VERSIONS: kept})
    return {**record, "version": version, "swap_seconds": seconds}


@router.get("/actions")
async def actions(request: Request, last: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
    return {"actions": [asdict(action) for action in request.app.state.gateway.controls.actions(last=last)]}


@router.get("/controls")
async def controls(request: Request) -> dict[str, Any]:
    gateway = request.app.state.gateway
    c = gateway.controls
    return {"training_paused": c.training_paused, "learner_overrides": c.learner_overrides,
            "serving_pin": c.serving_pin, "kept_versions": sorted(c.kept_versions),
            "serving_paused": gateway.completions.paused, "served_version": gateway.engine.stats().policy_version}
