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
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from .admin import admin_name
from .errors import Conflict, Forbidden, GatewayError, InvalidRequest, NotFound, Unauthorized
from .sessions import check_session_id

router = APIRouter(tags=["feedback"])


class FeedbackBody(BaseModel):
    session_id: str | None = Field(default=None, description="default: the session of the session key used")
    call_id: str | None = Field(default=None, description="one call of the session, instead of all of it")
    reward: float | None = None
    accept: bool | None = None


@dataclass(frozen=True)
class Sender:
    who: str  # the admin key's name, or "session-key:<session>"
    own_session: str | None  # the session of a session key; None for an admin


def feedback_sender(request: Request) -> Sender:
    """An admin key (feedback on any session) or a session's own key; checked before the body is."""
    gateway = request.app.state.gateway
    try:
        return Sender(admin_name(request), None)
    except GatewayError:
        pass
    key = gateway.api_key(request)
    own = gateway.store.session_for_key(key) if key else None
    if own is None:
        raise Unauthorized("feedback needs an admin key or the session's own key (Authorization: Bearer KEY)")
    return Sender(f"session-key:{own}", own)


@router.post("/v1/feedback")
async def feedback(
    body: FeedbackBody, request: Request, sender: Annotated[Sender, Depends(feedback_sender)]
) -> dict[str, Any]:
    gateway = request.app.state.gateway
    who, session_id = sender.who, body.session_id or sender.own_session
    if not session_id:
        raise InvalidRequest("session_id is required", param="session_id")
    check_session_id(session_id, "session_id")
    if sender.own_session is not None and session_id != sender.own_session:
        raise Forbidden("a session key may give feedback on its own session only")
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
