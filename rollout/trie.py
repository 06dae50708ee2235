"""A prefix tree of token ids, stored as runs (DESIGN section 2).

Each node holds a run of tokens; a call's ``prompt_ids + completion_ids`` is the path from a
root to the node where it ends. Inserting a path splits a node wherever the path leaves it,
so every call ends exactly at a node boundary and a shared prefix is stored once.

Invariants (tested):
- the tokens on the path root -> ``insert(ids).leaf`` are exactly ``ids``;
- siblings start with different tokens;
- the number of stored tokens equals the number of distinct prefixes of inserted paths.

A node's path never changes once it exists (a split gives the head a new id; the node keeps
its tokens' place), so the trie remembers the last path it inserted: an agent's next call
extends it, and is inserted from its end rather than walked from the root again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class TrieNode:
    id: int
    parent: int | None
    start: int  # depth of this node's first token on its path
    tokens: list[int]
    children: dict[int, int] = field(default_factory=dict)  # first token -> child id

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class InsertResult:
    leaf: int  # the node where the inserted path ends
    shared: int  # how many leading tokens were already in the trie
    created: list[TrieNode]
    changed: list[TrieNode]  # existing nodes whose parent, start or tokens changed by a split


class _NodeIds:
    """Node ids 1, 2, 3, ...: a class, not a closure, so a trie pickles (the learner sends its
    tries to its data-parallel ranks)."""

    def __init__(self) -> None:
        self.last = 0

    def __call__(self) -> int:
        self.last += 1
        return self.last


class Trie:
    def __init__(self, nodes: Iterable[TrieNode] = (), next_id: Callable[[], int] | None = None):
        self.nodes: dict[int, TrieNode] = {}
        self.roots: dict[int, int] = {}
        self._next_id = next_id or _NodeIds()
        self._last: tuple[int, list[int]] | None = None  # the last inserted path's leaf, and the path
        for node in nodes:
            self.nodes[node.id] = node
        for node in self.nodes.values():
            if node.parent is None:
                self.roots[node.tokens[0]] = node.id
            else:
                self.nodes[node.parent].children[node.tokens[0]] = node.id

    @property
    def num_tokens(self) -> int:
        return sum(len(node.tokens) for node in self.nodes.values())

    def path(self, node_id: int) -> list[int]:
        """All tokens from the root to the end of ``node_id``."""
        last = self._last
        if last is not None and last[0] == node_id:
            return list(last[1])
        runs = []
        current: int | None = node_id
        while current is not None:
            node = self.nodes[current]
            runs.append(node.tokens)
            current = node.parent
        return [token for run in reversed(runs) for token in run]

    def match(self, ids: Sequence[int]) -> int:
        """Length of the longest prefix of ``ids`` already in the trie."""
        depth, children = 0, self.roots
        while depth < len(ids) and ids[depth] in children:
            node = self.nodes[children[ids[depth]]]
            common = _common_length(node.tokens, ids, depth)
            depth += common
            if common < len(node.tokens):
                break
            children = node.children
        return depth

    def insert(self, ids: Sequence[int]) -> InsertResult:
        if not ids:
            raise ValueError("cannot insert an empty path")
        result = self._insert(ids)
        self._last = (result.leaf, list(ids))
        return result

    def _insert(self, ids: Sequence[int]) -> InsertResult:
        created: list[TrieNode] = []
        changed: list[TrieNode] = []
        depth: int = 0
        parent: int | None = None
        children = self.roots
        last = self._last
        if last is not None and len(last[1]) <= len(ids) and list(ids[: len(last[1])]) == last[1]:
            depth, parent = len(last[1]), last[0]  # extends the last path: go on from its end
            children = self.nodes[parent].children
        while True:
            if depth == len(ids):
                assert parent is not None
                return InsertResult(parent, depth, created, changed)
            child_id = children.get(ids[depth])
            if child_id is None:
                leaf = self._add(parent, depth, list(ids[depth:]), children)
                created.append(leaf)
                return InsertResult(leaf.id, depth, created, changed)
            node = self.nodes[child_id]
            common = _common_length(node.tokens, ids, depth)
            if common < len(node.tokens):
                head = self._split(node, common)
                created.append(head)
                changed.append(node)
                node = head
            depth += common
            parent, children = node.id, node.children

    def _add(self, parent: int | None, start: int, tokens: list[int], siblings: dict[int, int]) -> TrieNode:
        node = TrieNode(self._next_id(), parent, start, tokens)
        self.nodes[node.id] = node
        siblings[tokens[0]] = node.id
        return node

    def _split(self, node: TrieNode, at: int) -> TrieNode:
        """Cut ``node`` after ``at`` tokens: a new head node takes the first part and its place.

        The original node keeps its id (calls ending at it still end at it) and becomes the tail.
        """
        siblings = self.roots if node.parent is None else self.nodes[node.parent].children
        head = TrieNode(self._next_id(), node.parent, node.start, node.tokens[:at])
        self.nodes[head.id] = head
        siblings[head.tokens[0]] = head.id
        node.parent, node.start, node.tokens = head.id, node.start + at, node.tokens[at:]
        head.children[node.tokens[0]] = node.id
        return head


def _common_length(run: list[int], ids: Sequence[int], offset: int) -> int:
    n = min(len(run), len(ids) - offset)
    if run[:n] == list(ids[offset : offset + n]):
        return n
    lo, hi = 0, n  # the first mismatch lies in [lo, hi): binary search on slice equality
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run[lo:mid] == list(ids[offset + lo : offset + mid]):
            lo = mid
        else:
            hi = mid
    return lo
