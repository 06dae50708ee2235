"""A complete group from the store -> the rollout samples of one training step.

The gateway records one trie per session. The learner rebuilds one trie per group from the exact
token ids of its rollouts' calls, so the prompt the G rollouts share (and anything else they
share) is computed once by tree packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arborl.rollout.ledger import Group, RunLedger
from arborl.rollout.trie import Trie

from .packing import CallSpan
from .train_step import RolloutSample


@dataclass
class GroupSamples:
    group: Group
    samples: list[RolloutSample]
    oldest_version: int | None  # the policy version of the group's oldest sampled token (None: no tokens)
    calls: int


def load_group(ledger: RunLedger, group: Group) -> GroupSamples:
    store = ledger.store
    trie = Trie()
    samples, oldest, calls = [], None, 0
    for rollout in ledger.rollouts(group.id):
        spans, logp_rollout = [], {}
        for call in ledger.training_calls(rollout.session_id):
            prompt, completion = store.call_tokens(call)
            # A later insert may split this path's nodes, but the node a path ends at keeps its id.
            spans.append(CallSpan(call.id, trie.insert(prompt + completion).leaf, call.completion_len))
            logp_rollout[call.id] = torch.tensor(call.completion_logprobs, dtype=torch.float32)
            first = min(call.completion_versions)
            oldest = first if oldest is None else min(oldest, first)
        calls += len(spans)
        samples.append(RolloutSample(trie, spans, float(rollout.reward), group=group.id,
                                     logp_rollout=logp_rollout, domain=group.domain))
    return GroupSamples(group, samples, oldest, calls)
