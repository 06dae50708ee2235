"""``POST /v1/feedback``: a reward or an accept / reject for a production session, or one call.

    {"session_id": "...", "accept": true}
    {"session_id": "...", "call_id": "call-...", "reward": 0.3}

Who may send it: an admin key (any session), or the session's own key (an arborl session key:
then ``session_id`` may be left out). Sessions with feedback become training data, in the way
``learner.feedback`` selects (error-masked SFT on accepted sessions, or policy gradient against a
running baseline); sessions without feedback are kept and never trained on. Orchestrated rollouts
are graded by their verifiers and refuse feedback.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .admin import admin_name
from .errors import Conflict, Forbidden, GatewayError, InvalidRequest, NotFound, Unauthorized

router = APIRouter(tags=["feedback"])


class FeedbackBody(BaseModel):
    session_id: str | None = Field(default=None, description="default: the session of the session key used")
    call_id: str | None = Field(default=None, description="one call of the session, instead of all of it")
    reward: float | None = None
    accept: bool | None = None


def _sender(request: Request, session_id: str | None) -> tuple[str, str]:
    """(who, session): an admin key for any session, else the session's own key."""
    gateway = request.app.state.gateway
    try:
        who = admin_name(request)
    except GatewayError:
        who = None
    if who is not None:
        if not session_id:
            raise InvalidRequest("session_id is required", param="session_id")
        return who, session_id
    key = gateway.api_key(request)
    own = gateway.store.session_for_key(key) if key else None
    if own is None:
        raise Unauthorized("feedback needs an admin key or the session's own key (Authorization: Bearer KEY)")
    if session_id and session_id != own:
        raise Forbidden("a session key may give feedback on its own session only")
    return f"session-key:{own}", own


@router.post("/v1/feedback")
async def feedback(body: FeedbackBody, request: Request) -> dict[str, Any]:
    gateway = request.app.state.gateway
    who, session_id = _sender(request, body.session_id)
    if body.reward is None and body.accept is None:
        raise InvalidRequest("give a reward or accept (true / false)")
    if body.reward is not None and not math.isfinite(body.reward):
        raise InvalidRequest("reward must be a finite number", param="reward")
    calls = gateway.store.calls(session_id)
    if not calls:
        raise NotFound(f"no recorded calls in session {session_id!r}")
    if body.call_id is not None and body.call_id not in {call.id for call in calls}:
        raise NotFound(f"session {session_id!r} has no call {body.call_id!r}")
    ledger = gateway.ledger
    if ledger.is_rollout(session_id):
        raise Conflict(f"session {session_id!r} is an orchestrated rollout: its verifier gives its reward")
    record = ledger.add_feedback(session_id, who=who, call_id=body.call_id, reward=body.reward, accept=body.accept)
    return asdict(record)
