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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from arborl.rollout.records import StoredCall
from arborl.rollout.store import TrajectoryStore

from .rendering import ChatMessage, ChatRenderer


@dataclass(frozen=True)
class PromptPlan:
    prompt_ids: list[int]
    stitched_from: str | None = None
    branch_reason: str | None = None
    stitched_tokens: int = 0  # prompt tokens reused from the earlier call rather than tokenised


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
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


class Stitcher:
    def __init__(self, store: TrajectoryStore, renderer: ChatRenderer):
        self.store = store
        self.renderer = renderer

    def plan(
        self,
        session_id: str,
        messages: list[ChatMessage],
        prompt_text: str,
        *,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
    ) -> PromptPlan:
        """The prompt ids for ``messages`` (rendered as ``prompt_text``) in this session."""
        calls = [c for c in self.store.calls(session_id) if c.status == "ok" and c.response_message is not None]
        if not calls:
            return PromptPlan(self.renderer.encode(prompt_text))
        canonical = [_canonical_message(m) for m in messages]
        reason = "history_edited"
        # The longest earlier call whose messages this conversation repeats but whose reply it
        # changes (OpenCode rewrites a call to an unknown tool, say), and why it differs.
        diverged: tuple[StoredCall, str] | None = None
        for call in sorted(calls, key=lambda c: (len(c.messages), c.seq), reverse=True):
            k = len(call.messages)
            if len(messages) <= k or canonical[:k] != [_canonical_message(m) for m in call.messages]:
                continue
            reply = call.response_message
            assert reply is not None
            if canonical[k] != _canonical_message(reply):
                if _canonical_message(messages[k], ignore_reasoning=True) == _canonical_message(
                    reply, ignore_reasoning=True
                ):
                    reason = "reasoning_dropped"
                diverged = diverged or (call, reason)
                continue
            plan = self._extend(call, messages[: k + 1], prompt_text, tools, enable_thinking)
            if plan is not None:
                if diverged is not None and len(diverged[0].messages) > k:
                    # Stitched onto an earlier turn, the changed later reply tokenised afresh:
                    # unless that reproduces its sampled ids, the prompt leaves that call's path.
                    prompt, completion = self.store.call_tokens(diverged[0])
                    if plan.prompt_ids[: len(prompt) + len(completion)] != prompt + completion:
                        plan = replace(plan, branch_reason=diverged[1])
                return plan
            reason = "template_unstable"
            break
        ids = self.renderer.encode(prompt_text)
        return PromptPlan(ids, branch_reason=self._classify(session_id, calls, ids, reason))

    def _extend(
        self, call: StoredCall, through_reply: list[ChatMessage], prompt_text: str, tools, enable_thinking
    ) -> PromptPlan | None:
        """Ids of ``call``'s path followed by the template text after its reply, if consistent."""
        rendered = self.renderer.render(
            through_reply, tools, add_generation_prompt=False, enable_thinking=enable_thinking
        ).text
        suffix = self.renderer.turn_suffix
        if not prompt_text.startswith(rendered) or not rendered.endswith(suffix):
            return None
        prompt_ids, completion_ids = self.store.call_tokens(call)
        tail = suffix
        if completion_ids and call.finish_reason == "stop":
            # The sampled turn-end token (e.g. <|im_end|>) already covers the start of the suffix.
            last = self.renderer.tokenizer.decode([completion_ids[-1]])
            if last and suffix.startswith(last):
                tail = suffix[len(last) :]
        continuation = tail + prompt_text[len(rendered) :]
        reused = prompt_ids + completion_ids
        return PromptPlan(reused + self.renderer.encode(continuation), call.id, None, len(reused))

    def _classify(self, session_id: str, calls: list[StoredCall], ids: list[int], reason: str) -> str | None:
        """None when fresh tokenisation still extends (or repeats) an earlier call; else why it broke."""
        trie = self.store.trie(session_id)
        depth = trie.match(ids)
        if depth == 0:
            return "new_root"
        for call in calls:
            end = call.prompt_len + call.completion_len
            if end <= depth and trie.path(call.node_id) == ids[:end]:
                return None  # the prompt extends this call exactly
            if call.prompt_len == len(ids) <= depth and trie.path(call.node_id)[: len(ids)] == ids:
                return None  # the same prompt again (a retry or another sample)
        return reason
