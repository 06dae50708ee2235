"""The recorded data model: what one API call leaves in the store (DESIGN section 2)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

CallStatus = Literal["ok", "cancelled", "error"]


@dataclass
class CallRecord:
    """One API request and the completion the policy sampled for it.

    ``prompt_ids + completion_ids`` is the exact sequence the engine saw and produced;
    ``completion_logprobs[i]`` and ``completion_versions[i]`` belong to ``completion_ids[i]``.
    ``messages`` and ``response_message`` are the conversation in the gateway's normalised
    chat form, kept so the next call of the session can be stitched onto this one.
    """

    id: str
    session_id: str
    dialect: str
    model: str
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_logprobs: list[float]
    completion_versions: list[int]
    status: CallStatus = "ok"
    finish_reason: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    response_message: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    request_body: str = ""
    response_body: str = ""
    token_exact: bool = True
    stitched_from: str | None = None
    branch_reason: str | None = None
    error: str | None = None
    purpose: str = "main"  # main | subagent | title | side; only main and subagent calls are trained on
    created_at: float = field(default_factory=time.time)
    first_token_at: float | None = None
    finished_at: float | None = None
    # Set by the store when the call is recorded: its place in its session, and its trie leaf.
    seq: int | None = None
    node_id: int | None = None

    @property
    def path_length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class StoredCall:
    """A call as read back from the store (token ids are rebuilt from its trie path)."""

    id: str
    session_id: str
    seq: int
    dialect: str
    status: str
    finish_reason: str | None
    node_id: int
    prompt_len: int
    completion_len: int
    completion_logprobs: list[float]
    completion_versions: list[int]
    messages: list[dict[str, Any]]
    response_message: dict[str, Any] | None
    token_exact: bool
    stitched_from: str | None
    branch_reason: str | None
    created_at: float
    finished_at: float | None
    purpose: str = "main"

    @property
    def versions(self) -> list[int]:
        """The distinct policy versions that produced this call's tokens, in order."""
        seen: list[int] = []
        for version in self.completion_versions:
            if not seen or seen[-1] != version:
                seen.append(version)
        return seen
