"""What the orchestrator asks of the gateway that records its rollouts: a session key per rollout,
and the calls a rollout made so far (for the turn limit and the result's figures).

Two ways to ask, one protocol:
- ``GatewaySessions``: over HTTP, through the gateway's admin API. A rollout worker on another
  machine needs only the gateway's URL and an admin key; nothing reads the gateway's files.
- ``StoreSessions``: the gateway runs in this process, on this store (``arborl eval`` and
  ``arborl rollout`` without ``--gateway``), so the answers come from the store itself.

Both answer the same: a key issued either way records into its session only, and call counts
include the session's sub-sessions (sub-agents, side calls).
"""

from __future__ import annotations

import time
from typing import Protocol

import httpx

from .store import CallStats, RunLedger


class GatewaySessionError(RuntimeError):
    """The gateway refused or could not answer (a wrong admin key, a gateway that is down)."""


class RolloutSessions(Protocol):
    def issue_session_key(self, session_id: str) -> str:
        """A new API key whose calls are recorded into ``session_id``."""
        ...

    def call_stats(self, session_id: str) -> CallStats:
        """The calls recorded for the session (and its sub-sessions) so far."""
        ...


class StoreSessions:
    """The in-process gateway's store answers (the gateway and the orchestrator share it)."""

    def __init__(self, ledger: RunLedger):
        self._ledger = ledger

    def issue_session_key(self, session_id: str) -> str:
        return self._ledger.store.issue_session_key(session_id)

    def call_stats(self, session_id: str) -> CallStats:
        return self._ledger.call_stats(session_id)


class GatewaySessions:
    """A running gateway answers, over its admin API (``gateway/admin.py``)."""

    def __init__(self, url: str, admin_key: str, *, timeout_s: float = 30.0, attempts: int = 3):
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s,
                                    headers={"authorization": f"Bearer {admin_key}"})
        self._attempts = attempts  # a 503 (its store reconnecting) or a dropped connection is retried

    def check(self) -> None:
        """Raise ``GatewaySessionError`` now, before any rollout starts, if the admin key is refused."""
        self._ask("GET", "/admin/policy")

    def issue_session_key(self, session_id: str) -> str:
        return str(self._ask("POST", f"/admin/sessions/{session_id}/key")["api_key"])

    def call_stats(self, session_id: str) -> CallStats:
        answer = self._ask("GET", f"/admin/sessions/{session_id}/calls")
        return CallStats(calls=answer["calls"], prompt_tokens=answer["prompt_tokens"],
                         completion_tokens=answer["completion_tokens"], model_s=answer["model_s"],
                         refused=answer["refused"], cancelled=answer["cancelled"])

    def close(self) -> None:
        self._client.close()

    def _ask(self, method: str, path: str) -> dict:
        for attempt in range(1, self._attempts + 1):
            try:
                response = self._client.request(method, path)
            except httpx.HTTPError as exc:
                if attempt == self._attempts:
                    raise GatewaySessionError(f"the gateway at {self._client.base_url} did not answer: {exc}") from exc
            else:
                if response.status_code == 503 and attempt < self._attempts:
                    time.sleep(min(10.0, float(response.headers.get("retry-after", "1"))))
                    continue
                if response.status_code != 200:
                    raise GatewaySessionError(f"the gateway at {self._client.base_url} refused {method} {path}: "
                                              f"{response.status_code} {response.text[:300]}")
                return response.json()
            time.sleep(1.0)
        raise AssertionError("unreachable")
