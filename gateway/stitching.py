"""Token-exact stitching of a session's conversation (DESIGN section 3).

An agent sends the whole conversation on every call. Re-tokenising the assistant turns it
sends back would not reproduce the ids the policy sampled (the template re-renders tool calls,
BPE merges across the boundary differently, ...), so training would see tokens the policy
never produced. Instead, when the new messages start with an earlier call's messages followed
by that call's reply, the prompt is built as

    earlier prompt ids + earlier completion ids + ids of (template text after that reply)

so every turn extends the previous one in the trie. Where the context really changed, the
prompt is tokenised afresh and the call branches at its first differing token; the reason is
recorded and counted:

- ``reasoning_dropped``: the client sent a reply back without the reasoning it contained;
- ``history_edited``: the conversation shares a beginning with the session but differs later
  (compaction, edits, a sub-agent reusing the system prompt);
- ``template_unstable``: the messages match but the template does not render the longer
  conversation as an extension of the shorter one;
- ``new_root``: nothing in common with the session's trie (another system prompt, a side call).

The hot path does not grow with the session's history (DESIGN section 11): what stitching needs
of the session's earlier calls (their reply, their trie path, and a hash of the conversation
they were asked) is kept in memory, indexed by that hash, and looked up with one pass over the
new request's messages. A session not in memory (a restart; another gateway served it) is loaded
from the store once; one indexed read per call tells whether another process added calls since.
The hashes are Python's (salted per process, so not forgeable by a client; recomputed on load);
two different conversations hashing alike would only make a call stitch onto the wrong turn,
and at 64 bits that takes about 2**32 turns in one session.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from arborl.rollout.records import CallRecord, StoredCall
from arborl.rollout.store import TrajectoryStore

from .errors import ContextLengthExceeded
from .json_nesting import nesting_exceeds
from .rendering import ChatMessage, ChatRenderer, ConversationPrompt


@dataclass(frozen=True)
class PromptPlan:
    prompt_ids: list[int]
    stitched_from: str | None = None
    branch_reason: str | None = None
    stitched_tokens: int = 0  # prompt tokens reused from the earlier call rather than tokenised
    conversation_hash: int | None = None  # of the request's messages: how a later call finds this one


def _canonical_message(message: ChatMessage, *, ignore_reasoning: bool = False) -> tuple:
    calls = tuple(
        (call.get("name"), _canonical_arguments(call.get("arguments", "")))
        for call in message.get("tool_calls") or ()
    )
    reasoning = "" if ignore_reasoning else (message.get("reasoning") or "").strip()
    return (
        message.get("role"),
        (message.get("content") or "").strip(),
        calls,
        message.get("tool_call_id") or "",
        reasoning,
    )


def _canonical_arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        if nesting_exceeds(arguments):  # compared as text; rendering refuses it with a 400
            return arguments
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def _prefix_hashes(canonical: list[tuple], known: list[int] | None = None) -> list[int]:
    """``out[k]``: a hash of ``canonical[:k]`` (one pass; ``out[0]`` is the empty conversation's).
    ``known``: the hashes of a prefix of ``canonical``, already computed (at least ``[0]``)."""
    out = list(known or [0])
    for message in canonical[len(out) - 1 :]:
        out.append(hash((out[-1], message)))
    return out


@dataclass(frozen=True)
class ServedTurn:
    """What stitching needs of an earlier successful call of the session (no messages: those
    would make a session's memory grow with the square of its length)."""

    call_id: str
    seq: int
    messages: int  # how many messages the call was asked
    reply: tuple  # the canonical form of its reply, and the same without reasoning
    reply_without_reasoning: tuple
    finish_reason: str | None
    node_id: int
    prompt_len: int
    completion_len: int


@dataclass
class SessionTurns:
    """One session's served turns, indexed by (messages asked, hash of their canonical forms)."""

    turns: list[ServedTurn] = field(default_factory=list)
    by_conversation: dict[tuple[int, int], list[ServedTurn]] = field(default_factory=dict)
    last_seq: int = -1  # of the latest call seen, successful or not
    # The latest conversation planned here: its messages, their canonical forms and prefix
    # hashes. The next call repeats it, so only the messages it added are made canonical.
    latest: tuple[list[ChatMessage], list[tuple], list[int]] = ([], [], [0])

    def forms(self, messages: list[ChatMessage]) -> tuple[list[tuple], list[int]]:
        """Canonical forms and prefix hashes of ``messages``, reusing the latest conversation's
        for the messages equal to its own (a dict comparison, far cheaper than the forms)."""
        known, known_forms, known_hashes = self.latest
        same = len(known) if messages[: len(known)] == known else 0
        if not same:
            while same < min(len(known), len(messages)) and messages[same] == known[same]:
                same += 1
        canonical = known_forms[:same] + [_canonical_message(m) for m in messages[same:]]
        hashes = _prefix_hashes(canonical, known_hashes[: same + 1])
        self.latest = (list(messages), canonical, hashes)
        return canonical, hashes

    def add(self, turn: ServedTurn, conversation_hash: int) -> None:
        self.turns.append(turn)
        self.by_conversation.setdefault((turn.messages, conversation_hash), []).append(turn)

    def repeated_by(self, hashes: list[int]) -> Iterator[ServedTurn]:
        """Turns whose conversation the new one (with these prefix hashes) starts with and goes
        beyond: the longest first, the latest first among equals."""
        for k in range(len(hashes) - 2, -1, -1):
            yield from sorted(self.by_conversation.get((k, hashes[k]), ()), key=lambda t: t.seq, reverse=True)


def _served_turn(call_id: str, seq: int, messages: int, reply: ChatMessage, finish_reason: str | None,
                 node_id: int, prompt_len: int, completion_len: int) -> ServedTurn:
    return ServedTurn(call_id, seq, messages, _canonical_message(reply),
                      _canonical_message(reply, ignore_reasoning=True), finish_reason, node_id, prompt_len,
                      completion_len)


class Stitcher:
    def __init__(self, store: TrajectoryStore, renderer: ChatRenderer, *, sessions: int = 1024):
        self.store = store
        self.renderer = renderer
        self._sessions: OrderedDict[str, SessionTurns] = OrderedDict()
        self._max_sessions = sessions
        self._lock = threading.Lock()  # plans run in worker threads

    def plan(self, session_id: str, prompt: ConversationPrompt, *, context_length: int | None = None) -> PromptPlan:
        """The prompt ids for ``prompt``'s messages in this session. A prompt that cannot fit in
        ``context_length`` tokens, whatever its text encodes to, is refused before it is tokenised
        (``ContextLengthExceeded``)."""
        messages = prompt.messages
        session = self._session(session_id)
        canonical, hashes = session.forms(messages)
        if not session.turns:
            return PromptPlan(self._encode(prompt.whole.text, 0, context_length), conversation_hash=hashes[-1])
        reason = "history_edited"
        # The longest earlier call whose messages this conversation repeats but whose reply it
        # changes (OpenCode rewrites a call to an unknown tool, say), and why it differs.
        diverged: tuple[ServedTurn, str] | None = None
        for turn in session.repeated_by(hashes):
            k = turn.messages
            if canonical[k] != turn.reply:
                if _canonical_message(messages[k], ignore_reasoning=True) == turn.reply_without_reasoning:
                    reason = "reasoning_dropped"
                diverged = diverged or (turn, reason)
                continue
            plan = self._extend(session_id, turn, prompt, context_length)
            if plan is not None:
                plan = replace(plan, conversation_hash=hashes[-1])
                if diverged is not None and diverged[0].messages > k:
                    # Stitched onto an earlier turn, the changed later reply tokenised afresh:
                    # unless that reproduces its sampled ids, the prompt leaves that call's path.
                    earlier, completion = self._tokens(session_id, diverged[0])
                    if plan.prompt_ids[: len(earlier) + len(completion)] != earlier + completion:
                        plan = replace(plan, branch_reason=diverged[1])
                return plan
            reason = "template_unstable"
            break
        ids = self._encode(prompt.whole.text, 0, context_length)
        return PromptPlan(ids, branch_reason=self._classify(session_id, session.turns, ids, reason),
                          conversation_hash=hashes[-1])

    def _encode(self, text: str, reused: int, context_length: int | None) -> list[int]:
        """``text``'s ids, to follow ``reused`` ids; refused unread if they cannot fit the context."""
        fewest = reused + self.renderer.fewest_tokens(text)
        if context_length is not None and fewest >= context_length:
            raise ContextLengthExceeded(fewest, context_length, at_least=True)
        return self.renderer.encode(text)

    def remember(self, call: CallRecord, plan: PromptPlan) -> None:
        """``call`` (planned as ``plan``) is recorded: a later call of its session may extend it."""
        with self._lock:
            session = self._sessions.get(call.session_id)
            if session is None or call.seq is None or call.node_id is None:
                return  # not in memory: loaded from the store (with this call) when next needed
            session.last_seq = max(session.last_seq, call.seq)
            if call.status == "ok" and call.response_message is not None and plan.conversation_hash is not None:
                turn = _served_turn(call.id, call.seq, len(call.messages), call.response_message,
                                    call.finish_reason, call.node_id, len(call.prompt_ids), len(call.completion_ids))
                session.add(turn, plan.conversation_hash)

    def _session(self, session_id: str) -> SessionTurns:
        """The session's turns: from memory, or loaded once from the store when this process has
        not seen them all (a restart, or another gateway served the session meanwhile)."""
        last_seq = self.store.last_seq(session_id)
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.last_seq >= last_seq:
                self._sessions.move_to_end(session_id)
                return session
        session = self._load(session_id)
        with self._lock:
            self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        return session

    def _load(self, session_id: str) -> SessionTurns:
        session = SessionTurns()
        # Calls read back from deltas share their earlier messages' objects: each is made
        # canonical once, not once per call that repeats it.
        canonical: dict[int, tuple] = {}
        for call in self.store.calls(session_id):
            session.last_seq = max(session.last_seq, call.seq)
            if call.status == "ok" and call.response_message is not None:
                forms = [canonical.get(id(m)) or canonical.setdefault(id(m), _canonical_message(m))
                         for m in call.messages]
                session.add(_stored_turn(call), _prefix_hashes(forms)[-1])
        return session

    def _tokens(self, session_id: str, turn: ServedTurn) -> tuple[list[int], list[int]]:
        path = self.store.trie(session_id, seen_seq=turn.seq).path(turn.node_id)
        return path[: turn.prompt_len], path[turn.prompt_len :]

    def _extend(self, session_id: str, turn: ServedTurn, prompt: ConversationPrompt,
                context_length: int | None) -> PromptPlan | None:
        """Ids of ``turn``'s path followed by the template text after its reply, if consistent."""
        after = prompt.after(turn.messages)
        if after is None:
            return None
        prompt_ids, completion_ids = self._tokens(session_id, turn)
        suffix = tail = self.renderer.turn_suffix
        if completion_ids and turn.finish_reason == "stop":
            # The sampled turn-end token (e.g. <|im_end|>) already covers the start of the suffix.
            last = self.renderer.tokenizer.decode([completion_ids[-1]])
            if last and suffix.startswith(last):
                tail = suffix[len(last) :]
        reused = prompt_ids + completion_ids
        continuation = self._encode(tail + after, len(reused), context_length)
        return PromptPlan(reused + continuation, turn.call_id, None, len(reused))

    def _classify(self, session_id: str, turns: list[ServedTurn], ids: list[int], reason: str) -> str | None:
        """None when fresh tokenisation still extends (or repeats) an earlier call; else why it broke."""
        trie = self.store.trie(session_id, seen_seq=max((turn.seq for turn in turns), default=-1))
        depth = trie.match(ids)
        if depth == 0:
            return "new_root"
        for turn in turns:
            end = turn.prompt_len + turn.completion_len
            if end <= depth and trie.path(turn.node_id) == ids[:end]:
                return None  # the prompt extends this call exactly
            if turn.prompt_len == len(ids) <= depth and trie.path(turn.node_id)[: len(ids)] == ids:
                return None  # the same prompt again (a retry or another sample)
        return reason


def _stored_turn(call: StoredCall) -> ServedTurn:
    assert call.response_message is not None
    return _served_turn(call.id, call.seq, len(call.messages), call.response_message, call.finish_reason,
                        call.node_id, call.prompt_len, call.completion_len)
