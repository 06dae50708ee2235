"""Operator controls of a running run, and the audit log of every operator action.

Operators act through the gateway's admin API (``arborl ops ...``); the gateway writes the
control here, in the run's store, and the learner reads it before every step. So a control
outlives the process that set it, and every component sees the same state:

- ``training_paused``: the learner takes no step while it is true;
- ``learner_overrides``: ``lr`` and ``max_staleness`` set at run time, over the configuration;
- ``serving_pin``: the version serving was rolled back to; while set, the learner trains but
  does not publish (until an operator promotes a version);
- ``kept_versions``: versions whose checkpoints are never pruned (rolled back to or promoted).

Each action is a row of ``admin_actions``: when, who (the admin key's name), what, and its
details, written in the same transaction as the control it changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .trajectories import TrajectoryStore

TRAINING_PAUSED = "training_paused"
LEARNER_OVERRIDES = "learner_overrides"
SERVING_PIN = "serving_pin"
KEPT_VERSIONS = "kept_versions"


@dataclass(frozen=True)
class AdminAction:
    id: int
    at: float
    who: str
    action: str
    details: dict[str, Any]


class RunControls:
    def __init__(self, store: TrajectoryStore):
        """The controls' tables are part of every store's schema (the implementation creates them)."""
        self.store = store

    def get(self, key: str, default: Any = None) -> Any:
        rows = self.store.query("SELECT value FROM controls WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def act(self, who: str, action: str, details: dict[str, Any], changes: dict[str, Any]) -> AdminAction:
        """Apply ``changes`` (control key -> new value) and log the action, atomically."""
        now = time.time()
        with self.store.transaction() as db:
            for key, value in changes.items():
                db.execute(
                    "INSERT INTO controls(key, value, updated_at, updated_by) VALUES (?, ?, ?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, "
                    "updated_by = excluded.updated_by",
                    (key, json.dumps(value), now, who),
                )
            action_id = int(db.execute(
                "INSERT INTO admin_actions(at, who, action, details) VALUES (?, ?, ?, ?) RETURNING id",
                (now, who, action, json.dumps(details))).fetchone()[0])
            return AdminAction(action_id, now, who, action, details)

    def actions(self, *, last: int = 100) -> list[AdminAction]:
        rows = self.store.query(
            "SELECT * FROM (SELECT id, at, who, action, details FROM admin_actions ORDER BY id DESC LIMIT ?) "
            "newest ORDER BY id", (last,))
        return [AdminAction(i, at, who, action, json.loads(details)) for i, at, who, action, details in rows]

    # -- what the learner reads -----------------------------------------------------------------

    @property
    def training_paused(self) -> bool:
        return bool(self.get(TRAINING_PAUSED, False))

    @property
    def learner_overrides(self) -> dict[str, Any]:
        return dict(self.get(LEARNER_OVERRIDES, {}))

    @property
    def serving_pin(self) -> int | None:
        return self.get(SERVING_PIN)

    @property
    def kept_versions(self) -> set[int]:
        return set(self.get(KEPT_VERSIONS, []))
