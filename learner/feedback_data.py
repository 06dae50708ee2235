"""Feedback on production sessions -> the samples of one feedback step.

An operator (or the session's own key) attaches a reward or an accept / reject to a session or to
one of its calls (``POST /v1/feedback``). ``learner.feedback`` selects how it trains:

- ``sft``: error-masked SFT on accepted sessions (accept true, or a reward >= 1 without an accept):
  the policy imitates its own accepted completions, except the tokens of calls whose tool call
  failed (the tool's answer in the next call reads as an error);
- ``pg``: policy gradient with advantage = reward - baseline, the baseline a running mean of the
  feedback rewards seen so far (kept in the step's metrics, so a resumed learner continues it);
- ``off``: feedback is recorded and never trained on.

Sessions without feedback are never trained on. The latest feedback on a session (or call) wins;
every pending item is marked consumed by the step that used it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from arborl.rollout.records import StoredCall
from arborl.rollout.store import Feedback, RunLedger
from arborl.rollout.trie import Trie

from .group_data import insert_calls
from .train_step import RolloutSample

# What a failed tool call's result looks like in the next request, across scaffolds.
FAILED_TOOL = re.compile(r"^\s*(error|Error|ERROR)\b|Traceback \(most recent call last\)|exit code [1-9]|"
                         r"command not found|No such file or directory")


@dataclass
class FeedbackBatch:
    samples: list[RolloutSample]
    used: list[int]  # feedback ids the step consumes (trained on or not)
    baseline: float  # the running baseline after this batch (pg)
    sessions: list[str]  # the sessions trained on
    refused: Counter[str] = field(default_factory=Counter)  # calls not trained on, by reason (learner.group_data)


def failed_calls(calls: list[StoredCall]) -> set[str]:
    """Calls whose tool call failed: the messages the next call adds after the reply report an error."""
    failed = set()
    for call, following in pairwise(calls):
        new = following.messages[len(call.messages) + 1:]
        for message in new:
            if message.get("role") in ("tool", "user") and FAILED_TOOL.search(_text(message.get("content"))):
                failed.add(call.id)
                break
    return failed


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return json.dumps(content) if content is not None else ""


def latest_per_target(items: list[Feedback]) -> dict[tuple[str, str | None], Feedback]:
    latest: dict[tuple[str, str | None], Feedback] = {}
    for item in items:  # oldest first
        latest[(item.session_id, item.call_id)] = item
    return latest


def load_feedback(ledger: RunLedger, items: list[Feedback], mode: str, baseline: float, *,
                  decay: float = 0.9) -> FeedbackBatch:
    store = ledger.store
    samples: list[RolloutSample] = []
    sessions: list[str] = []
    refused: Counter[str] = Counter()
    for index, ((session, call_id), item) in enumerate(latest_per_target(items).items()):
        accepted = item.accept if item.accept is not None else (item.reward is not None and item.reward >= 1.0)
        if mode == "sft" and not accepted:
            continue
        calls = [call for call in ledger.training_calls(session) if call_id is None or call.id == call_id]
        if not calls:
            continue
        failed = failed_calls(ledger.training_calls(session)) if mode == "sft" else set()
        trie = Trie()
        spans = []
        logp_rollout: dict[Hashable, torch.Tensor] = {}  # these two keyed as CallSpan.key
        masks: dict[Hashable, torch.Tensor] = {}
        for call, span in insert_calls(store, trie, calls, refused):
            spans.append(span)
            logp_rollout[call.id] = torch.tensor(call.completion_logprobs, dtype=torch.float32)
            masks[call.id] = torch.full((call.completion_len,), 0.0 if call.id in failed else 1.0)
        if not spans:
            continue
        advantage = None
        if mode == "pg":
            advantage = item.value - baseline
            baseline = decay * baseline + (1 - decay) * item.value
        samples.append(RolloutSample(trie, spans, item.value, group=index, logp_rollout=logp_rollout,
                                     advantage=advantage, sft_mask=masks if mode == "sft" else None))
        sessions.append(session)
    return FeedbackBatch(samples, [item.id for item in items], baseline, sessions, refused)
