"""What one rollout came to: the record the orchestrator writes and `arborl eval` reports on.

A rollout either ran to the end (``status == "done"``: the agent worked, the verifier graded the
workspace, ``reward`` is set; a wrong answer is reward 0), or failed for infrastructure reasons
(``status == "infra_failed"``: the sandbox did not start, the scaffold crashed before its first
model call, grading could not run), or its task's verifier gave no reward
(``status == "verifier_failed"``: the task's script timed out, wrote no reward file, or one that
is not a number). Both failures are retried under a new session and never become training
samples; ``attempts`` counts the tries a result took, and the result of the last try decides
which failure it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["done", "infra_failed", "verifier_failed"]
FAILED_STATUSES: tuple[Status, ...] = ("infra_failed", "verifier_failed")

# Why the agent phase ended.
SUBMITTED = "submitted"  # the scaffold said it was done (builtin: the submit tool; a CLI: exit 0)
AGENT_ERROR = "agent_error"  # the scaffold exited non-zero after it had used the model
TIME_LIMIT = "time_limit"  # the task's agent timeout (or the sandbox's wall limit)
TURN_LIMIT = "turn_limit"  # more model calls than the turn limit
NO_ACTION = "no_action"  # a scaffold that does not use the model (oracle, nop) finished
STOPPED = "stopped"  # the run was interrupted (the rollout is redone on resume)


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each phase of one rollout. ``model_s`` is the sum of the session's call
    durations as the gateway recorded them; ``tools_s`` the agent's own commands (measured by the
    builtin scaffold; for a CLI, agent time minus model time). ``overhead_s`` is everything else:
    sandbox set-up and teardown, materialising the workspace, installing hidden tests, writing
    the ledger, and the scaffold's own bookkeeping between calls."""

    total_s: float = 0.0
    setup_s: float = 0.0
    agent_s: float = 0.0
    model_s: float = 0.0
    tools_s: float = 0.0
    verify_s: float = 0.0
    teardown_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.total_s - self.model_s - self.tools_s - self.verify_s)


@dataclass(frozen=True)
class RolloutResult:
    session_id: str
    task_id: str
    scaffold: str
    group_id: int
    status: Status
    reward: float | None = None
    solved: bool = False
    resolution: str | None = None  # "FULL" / "PARTIAL" / "NO" for tests-graded tasks
    details: str = ""  # one line: why this reward, or what failed
    ended_by: str = ""  # SUBMITTED, AGENT_ERROR, TIME_LIMIT, TURN_LIMIT or NO_ACTION
    attempts: int = 1
    turns: int = 0  # model calls the rollout made (main and sub-agent)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    log: str = ""  # the rollout's log file, relative to the run folder
    cancelled_calls: int = 0  # model calls the agent cut off (its deadline, a stop): in the time, not turns
    failed_attempts: tuple[str, ...] = ()  # errors of the attempts before this one (infra, verifier failures)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutResult:
        data = dict(data)
        data["timings"] = Timings(**data.get("timings") or {})
        data["failed_attempts"] = tuple(data.get("failed_attempts") or ())
        return cls(**data)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
