"""Calls stored as deltas: each call keeps only what it adds to an earlier call of its session.

An agent sends the whole conversation on every call, so storing every request whole makes a
session's bytes grow with the square of its length (a synthetic 150-turn session held 13.5 MB
of messages). A call is stored instead against a *base*: an earlier call of the same session,
recorded by this process, that shares the most leading messages with it (equal as values; not
the looser comparison stitching uses), so that

    messages     = base.messages[:kept] + tail
    tools        = base.tools if tools_kept else tools
    request_body = base.body[:head] + middle + base.body[len(base.body) - tail:]

Invariants (every implementation of the store keeps them, and the contract tests check them):
- a base is recorded before every call that refers to it (same session, lower seq), so reading
  a session's calls in seq order rebuilds each from calls already rebuilt;
- rebuilding is exact: the messages, tools and request body read back are the ones recorded;
- a call with no base is stored whole: one that shares no leading message with a recent call of
  its session (the first of a session or a sub-agent in a process, after a restart, or when
  another gateway served the session before).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..records import CallRecord


@dataclass(frozen=True)
class WholeCall:
    """What a later call's delta is taken against, and what rebuilding a stored call gives."""

    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    request_body: str


@dataclass(frozen=True)
class CallDelta:
    """What a call stores about its request: only what it adds to ``base`` (all of it without one)."""

    base: str | None
    messages_kept: int
    messages: list[dict[str, Any]]
    tools_kept: bool
    tools: list[dict[str, Any]] | None
    request_head: int
    request_tail: int
    request_middle: str

    def rebuild(self, call_id: str, base: WholeCall | None) -> WholeCall:
        """The call whole again, from its delta and its base (rebuilt first; None without a base)."""
        if self.base is None:
            return WholeCall(call_id, self.messages, self.tools, self.request_middle)
        if base is None or base.id != self.base:
            raise ValueError(f"call {call_id} is stored against {self.base}, which was not rebuilt before it")
        body = base.request_body
        return WholeCall(
            call_id,
            base.messages[: self.messages_kept] + self.messages,
            base.tools if self.tools_kept else self.tools,
            body[: self.request_head] + self.request_middle + body[len(body) - self.request_tail :],
        )


def whole(call: CallRecord) -> CallDelta:
    """A call stored without a base."""
    return CallDelta(None, 0, call.messages, False, call.tools, 0, 0, call.request_body)


def common_head(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (binary search over C-level compares)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def common_tail(a: str, b: str, most: int) -> int:
    """Length (at most ``most``) of the longest common suffix of ``a`` and ``b``."""
    low, high = 0, min(len(a), len(b), most)
    while low < high:
        mid = (low + high + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            low = mid
        else:
            high = mid - 1
    return low


def shared_messages(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    """How many leading messages ``a`` and ``b`` have in common (equal as values)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, one C-level comparison: b extends a
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def delta_against(call: CallRecord, base: WholeCall, kept: int) -> CallDelta:
    """``call`` stored against ``base``, whose first ``kept`` messages it starts with."""
    old, new = base.request_body, call.request_body
    head = common_head(old, new)
    tail = common_tail(old, new, min(len(old), len(new)) - head)
    tools_kept = call.tools == base.tools
    return CallDelta(
        base.id, kept, call.messages[kept:], tools_kept, None if tools_kept else call.tools,
        head, tail, new[head : len(new) - tail],
    )


class RecentCalls:
    """The latest call of each recent conversation of a session, kept whole to be the next bases.

    A session holds several conversations at once (a main thread, sub-agents with their own system
    prompts, a branch after compaction); each keeps its latest call here: a call that extends its
    base wholly replaces it, any other starts a conversation of its own (the base stays, as its
    conversation may go on). Bounded: ``per_session``
    conversations for each of the ``sessions`` most recently active sessions; a conversation
    evicted from here stores its next call whole, and later ones as deltas again.
    """

    def __init__(self, *, sessions: int = 256, per_session: int = 4):
        self._calls: OrderedDict[str, list[WholeCall]] = OrderedDict()
        self._sessions = sessions
        self._per_session = per_session

    def delta(self, call: CallRecord) -> CallDelta:
        """``call`` stored against the recent call of its session it shares most leading messages
        with (the latest among equals), if the session has one."""
        best: tuple[int, WholeCall] | None = None
        for candidate in self._calls.get(call.session_id, ()):
            kept = shared_messages(candidate.messages, call.messages)
            if kept > 0 and (best is None or kept >= best[0]):
                best = kept, candidate
        return whole(call) if best is None else delta_against(call, best[1], best[0])

    def remember(self, call: CallRecord, base: str | None) -> None:
        """``call`` (stored against ``base``) committed: it may be the base of the session's next calls."""
        recent = self._calls.get(call.session_id, [])
        if base is not None and any(c.id == base and len(c.messages) <= len(call.messages)
                                    and call.messages[: len(c.messages)] == c.messages for c in recent):
            recent = [c for c in recent if c.id != base]  # it continues its base's conversation
        recent.append(WholeCall(call.id, call.messages, call.tools, call.request_body))
        self._calls[call.session_id] = recent[-self._per_session :]
        self._calls.move_to_end(call.session_id)
        while len(self._calls) > self._sessions:
            self._calls.popitem(last=False)
