"""Per-sequence KV storage and the session prefix cache of the embedded engine.

Each running sequence owns one key and one value buffer per layer, grown by doubling, so
appending a token is a slice write and attention reads a view. When a sequence ends, finished
or aborted, the KV it computed (prompt plus completion, all but the last sampled token, whose
KV was never computed; for an abort during prefill, the part of the prompt done) is kept in the
``PrefixCache`` under the session's key (the engine's ``_worth_caching`` says when not). The next request that
starts with the same tokens copies that prefix instead of recomputing it: an agent's turn
``n+1`` extends turn ``n``, so its time to first token pays only for the new tokens.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class SequenceKV:
    """Keys and values of one sequence: per layer a [1, kv_heads, capacity, head_dim] buffer."""

    def __init__(self, layout: KVLayout, capacity: int = 64):
        self.layout = layout
        self.length = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        lay = self.layout
        shape = (1, lay.num_kv_heads, capacity, lay.head_dim)

        def bigger(old: list[torch.Tensor]) -> list[torch.Tensor]:
            new = [torch.empty(shape, dtype=lay.dtype, device=lay.device) for _ in range(lay.num_layers)]
            for dst, src in zip(new, old, strict=False):
                dst[:, :, : self.length] = src[:, :, : self.length]
            return new

        self.keys, self.values = bigger(self.keys), bigger(self.values)
        self.capacity = capacity

    def reserve(self, extra_tokens: int) -> None:
        """Make room for ``extra_tokens`` more before a forward pass writes them."""
        needed = self.length + extra_tokens
        if needed > self.capacity:
            self._grow(max(needed, 2 * self.capacity))

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the [1, kv_heads, n, head_dim] key/value of tokens at positions start..start+n."""
        end = start + key.shape[2]
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def copy_prefix_from(self, other: SequenceKV, length: int) -> None:
        self.reserve(length - self.length)
        for layer in range(self.layout.num_layers):
            self.keys[layer][:, :, :length] = other.keys[layer][:, :, :length]
            self.values[layer][:, :, :length] = other.values[layer][:, :, :length]
        self.length = length


@dataclass
class CacheEntry:
    token_ids: np.ndarray  # int64, the tokens whose KV is stored
    kv: SequenceKV
    last_used: float = field(default_factory=time.monotonic)


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """Finished sequences' KV, keyed by session, bounded in tokens, evicted least recently used.

    A lookup considers every entry, not only the session's own, so the G rollouts of one task
    that share a long prompt also share its prefill.
    """

    def __init__(self, capacity_tokens: int):
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.cached_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token_ids: Sequence[int], key: str | None) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with ``token_ids`` and the shared length.

        The last prompt token is never reused: its logits are needed to sample the first token.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        best, best_len = None, 0
        for name, entry in self._entries.items():
            n = common_prefix_length(entry.token_ids, ids)
            if n > best_len or (n == best_len and n > 0 and name == key):
                best, best_len = entry, n
        best_len = min(best_len, len(ids) - 1)
        if best is None or best_len <= 0:
            return None, 0
        best.last_used = time.monotonic()
        return best, best_len

    def store(self, key: str, token_ids: Sequence[int], kv: SequenceKV) -> None:
        """Keep a finished sequence's buffers (no copy); they count at their allocated capacity."""
        if kv.length == 0 or kv.capacity > self.capacity_tokens:
            return
        self.remove(key)
        self._entries[key] = CacheEntry(np.asarray(token_ids[: kv.length], dtype=np.int64), kv)
        self.cached_tokens += kv.capacity
        while self.cached_tokens > self.capacity_tokens and self._entries:
            oldest = min(self._entries, key=lambda k: self._entries[k].last_used)
            self.remove(oldest)

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.cached_tokens -= entry.kv.capacity

    def clear(self) -> None:
        self._entries.clear()
        self.cached_tokens = 0
