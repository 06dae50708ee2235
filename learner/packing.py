"""Tries -> DFS-flattened micro-batches for training (DESIGN section 4).

A trie holds every call of a session (or group) once per shared prefix. Flattened in DFS
pre-order, every subtree is contiguous, so one forward pass over the flat tokens, with

- ``position_ids[t]`` = depth of t on its own path,
- attention from query q to key k iff ``k <= q <= end[k]`` (k is q or one of its ancestors),
- the logprob of token t read from the logits at ``parent[t]`` (not t - 1),

gives every token exactly the logits a separate forward of its own path would give. Each
call lists the flat indices of its completion tokens, so a per-call loss reads them directly.

Worked example (tested): tokens a, b, then branches (c, d) and (e): order [a, b, c, d, e],
parent [-1, 0, 1, 2, 1], position [0, 1, 2, 3, 2], end [4, 4, 3, 3, 4].
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from arborl.rollout.trie import Trie


@dataclass(frozen=True)
class CallSpan:
    """A call to train on: the trie node its path ends at, and how many of its last tokens it sampled."""

    key: Hashable
    node_id: int
    completion_len: int


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [N] long
    position_ids: torch.Tensor  # [N] long: depth on the token's own path
    parent: torch.Tensor  # [N] long: flat index of the previous token on the path, -1 at a root
    end: torch.Tensor  # [N] long: flat index of the last token of the token's subtree
    completion_index: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # call -> flat indices

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _chain(trie: Trie, node_id: int) -> list[int]:
    """Node ids from the root to ``node_id``."""
    chain = []
    current: int | None = node_id
    while current is not None:
        chain.append(current)
        current = trie.nodes[current].parent
    return chain[::-1]


def _used_children(trie: Trie, calls: Sequence[CallSpan]) -> dict[int | None, list[int]]:
    """parent -> children (by id, i.e. creation order) among the nodes the calls' paths use; None: roots."""
    used: set[int] = set()
    for call in calls:
        used.update(_chain(trie, call.node_id))
    children: dict[int | None, list[int]] = {}
    for node_id in sorted(used):
        children.setdefault(trie.nodes[node_id].parent, []).append(node_id)
    return children


def pack(pieces: Sequence[tuple[Trie, Sequence[CallSpan]]]) -> PackedBatch:
    """Flatten the nodes that the given calls' paths use, trie after trie, into one batch.

    Nodes no selected call passes through are left out; separate tries (and separate roots)
    are separate subtrees, so their tokens never attend to each other.
    """
    ids: list[int] = []
    positions: list[int] = []
    parents: list[int] = []
    ends: list[int] = []
    completion_index: dict[Hashable, torch.Tensor] = {}
    for trie, calls in pieces:
        children = _used_children(trie, calls)
        span: dict[int, range] = {}  # node -> its tokens' flat indices
        # Iterative DFS: (node, parent's last flat index); the subtree end is set when it closes.
        stack: list[tuple[int, int, bool]] = [(n, -1, False) for n in reversed(children.get(None, []))]
        while stack:
            node_id, parent_index, closing = stack.pop()
            if closing:
                for t in span[node_id]:
                    ends[t] = len(ids) - 1
                continue
            node = trie.nodes[node_id]
            first = len(ids)
            for i, token in enumerate(node.tokens):
                ids.append(token)
                positions.append(node.start + i)
                parents.append(parent_index if i == 0 else first + i - 1)
                ends.append(-1)
            span[node_id] = range(first, len(ids))
            stack.append((node_id, parent_index, True))
            for child in reversed(children.get(node_id, [])):
                stack.append((child, len(ids) - 1, False))
        for call in calls:
            flat = [i for n in _chain(trie, call.node_id) for i in span[n]]
            completion_index[call.key] = torch.tensor(flat[len(flat) - call.completion_len :], dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        parent=torch.tensor(parents, dtype=torch.long),
        end=torch.tensor(ends, dtype=torch.long),
        completion_index=completion_index,
    )


def path_length(trie: Trie, call: CallSpan) -> int:
    return trie.nodes[call.node_id].end


def split_by_budget(trie: Trie, calls: Sequence[CallSpan], budget: int) -> list[list[CallSpan]]:
    """Group calls into micro-batches of at most ``budget`` packed tokens, by whole subtrees.

    Walks the trie in DFS order. A subtree that fits (with its ancestors) joins the current
    micro-batch, or else starts the next one; only a subtree too large for any micro-batch is
    opened up, its own calls placed one by one and its children visited in turn. So the G
    rollouts below a shared prompt stay whole where they fit, and a cut falls between them rather
    than through one (which would repeat that rollout's whole prefix). Ancestors shared with other
    micro-batches are repeated in each. A call longer than the budget on its own gets a
    micro-batch of its own.
    """
    children = _used_children(trie, calls)
    ending: dict[int, list[CallSpan]] = {}
    for call in calls:
        ending.setdefault(call.node_id, []).append(call)
    subtree_tokens = _subtree_tokens(trie, children)

    batches: list[list[CallSpan]] = []
    current: list[CallSpan] = []
    current_nodes: set[int] = set()
    current_tokens = 0

    def missing(nodes: Sequence[int]) -> int:
        return sum(len(trie.nodes[n].tokens) for n in set(nodes) - current_nodes)

    def add(new_calls: list[CallSpan], nodes: list[int]) -> None:
        nonlocal current_tokens
        current_tokens += missing(nodes)
        current.extend(new_calls)
        current_nodes.update(nodes)

    def flush() -> None:
        nonlocal current, current_nodes, current_tokens
        if current:
            batches.append(current)
        current, current_nodes, current_tokens = [], set(), 0

    stack = list(reversed(children.get(None, [])))
    while stack:
        node_id = stack.pop()
        ancestors = _chain(trie, node_id)[:-1]
        whole = subtree_tokens[node_id]
        if trie.nodes[node_id].start + whole <= budget:  # the subtree and its ancestors fit in one
            if current_tokens + missing(ancestors) + whole > budget:
                flush()
            add(_calls_below(node_id, children, ending), ancestors + _nodes_below(node_id, children))
        else:  # too large for one micro-batch: its own calls, then each child subtree in turn
            for call in ending.get(node_id, []):
                if current and current_tokens + missing(ancestors + [node_id]) > budget:
                    flush()
                add([call], ancestors + [node_id])
            stack.extend(reversed(children.get(node_id, [])))
    flush()
    return batches


def _subtree_tokens(trie: Trie, children: dict[int | None, list[int]]) -> dict[int, int]:
    """Tokens of each used node's subtree (used nodes only), computed bottom-up."""
    order = [n for root in children.get(None, []) for n in _nodes_below(root, children)]
    total: dict[int, int] = {}
    for node_id in reversed(order):  # children before parents
        total[node_id] = len(trie.nodes[node_id].tokens) + sum(total[c] for c in children.get(node_id, []))
    return total


def _nodes_below(node_id: int, children: dict[int | None, list[int]]) -> list[int]:
    """``node_id`` and its used descendants, in DFS pre-order."""
    out, stack = [], [node_id]
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(reversed(children.get(current, [])))
    return out


def _calls_below(node_id: int, children: dict[int | None, list[int]], ending: dict[int, list[CallSpan]]):
    return [call for n in _nodes_below(node_id, children) for call in ending.get(n, [])]


@dataclass(frozen=True)
class PackingStats:
    """Tokens a forward pass computes under each way of laying the calls out."""

    packed: int  # the micro-batches of tree packing (repeated ancestors included)
    per_call: int  # every call as its own sequence (prompt + completion)
    per_path: int  # one sequence per maximal path (per rollout): calls that extend others are free

    @property
    def reduction_vs_per_call(self) -> float:
        return self.per_call / self.packed


def packing_stats(trie: Trie, calls: Sequence[CallSpan], batches: Sequence[Sequence[CallSpan]]) -> PackingStats:
    packed = sum(pack([(trie, batch)]).num_tokens for batch in batches)
    per_call = sum(path_length(trie, c) for c in calls)
    ends = {c.node_id for c in calls}
    on_longer_path = {n for node_id in ends for n in _chain(trie, node_id)[:-1]}
    per_path = sum(trie.nodes[n].end for n in ends if n not in on_longer_path)
    return PackingStats(packed, per_call, per_path)
