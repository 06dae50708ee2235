"""A complete group from the store -> the rollout samples of one training step.

The gateway records one trie per session. The learner rebuilds one trie per group from the exact
token ids of its rollouts' calls, so the prompt the G rollouts share (and anything else they
share) is computed once by tree packing.

This is where recorded calls enter training (feedback sessions too, through
:func:`insert_calls`): a call the ledger lists as trainable but the learner cannot train on is
refused here and counted by reason, never passed on. ``empty_prompt``: a call with no prompt
token, whose first completion token has no context, so no logprob or entropy (NaN) to learn from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch

from arborl.rollout.records import StoredCall
from arborl.rollout.store import Group, RunLedger, TrajectoryStore
from arborl.rollout.trie import Trie

from .packing import CallSpan
from .train_step import RolloutSample

EMPTY_PROMPT = "empty_prompt"
REFUSAL_REASONS = (EMPTY_PROMPT,)


@dataclass
class GroupSamples:
    group: Group
    samples: list[RolloutSample]
    oldest_version: int | None  # the policy version of the group's oldest sampled token (None: no tokens)
    calls: int
    refused: Counter[str] = field(default_factory=Counter)  # calls not trained on, by reason


def refusal_reason(call: StoredCall) -> str | None:
    """Why the learner will not train on ``call`` (one of ``REFUSAL_REASONS``), or None."""
    if call.prompt_len == 0:
        return EMPTY_PROMPT
    return None


def insert_calls(store: TrajectoryStore, trie: Trie, calls: Iterable[StoredCall],
                 refused: Counter[str]) -> list[tuple[StoredCall, CallSpan]]:
    """Insert each trainable call's exact tokens into ``trie``; count the others in ``refused``."""
    inserted = []
    for call in calls:
        reason = refusal_reason(call)
        if reason is not None:
            refused[reason] += 1
            continue
        prompt, completion = store.call_tokens(call)
        # A later insert may split this path's nodes, but the node a path ends at keeps its id.
        inserted.append((call, CallSpan(call.id, trie.insert(prompt + completion).leaf, call.completion_len)))
    return inserted


def load_group(ledger: RunLedger, group: Group) -> GroupSamples:
    trie = Trie()
    samples, oldest, calls = [], None, 0
    refused: Counter[str] = Counter()
    for rollout in ledger.rollouts(group.id):
        spans = []
        logp_rollout: dict[Hashable, torch.Tensor] = {}  # keyed as CallSpan.key
        for call, span in insert_calls(ledger.store, trie, ledger.training_calls(rollout.session_id), refused):
            spans.append(span)
            logp_rollout[call.id] = torch.tensor(call.completion_logprobs, dtype=torch.float32)
            first = min(call.completion_versions)
            oldest = first if oldest is None else min(oldest, first)
        calls += len(spans)
        assert rollout.reward is not None  # ledger.rollouts gives done rollouts, and finish_rollout set their reward
        samples.append(RolloutSample(trie, spans, float(rollout.reward), group=group.id,
                                     logp_rollout=logp_rollout, domain=group.domain))
    return GroupSamples(group, samples, oldest, calls, refused)
