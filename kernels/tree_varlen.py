"""Tree attention as variable-length causal attention over path segments (``arborl_tree_varlen``).

flash-attn's varlen kernel attends causally inside each of a list of sequences; a packed trie is
not a list of sequences (a branch reads its shared prefix, which lies elsewhere in the batch).
It becomes one when queries and keys are listed separately:

    segment   a maximal run of DFS-consecutive tokens, each the child of the one before
              (a new segment starts at t iff ``end[t-1] < t``: t-1's subtree is over, so t is a
              sibling branch or a new root)
    its keys  the ancestors of its first token (every ``k < s`` with ``end[k] >= s``, a few
              contiguous runs), then the segment's own tokens

Query i of a segment with A ancestor keys sees keys 0 .. A + i: a causal mask aligned to the
bottom-right corner, which is what ``flash_attn_varlen_func(causal=True)`` computes when a
sequence has more keys than queries. So the trie runs as one varlen call with
``cu_seqlens_q`` over the segments and ``cu_seqlens_k`` over the gathered keys; the key gather
(the same as ``arborl_tree_blocks``') is the only extra work, and the backward is flash-attn's
plus an index_add.

Where flash-attn cannot run (no CUDA, no flash_attn package, or a dtype other than float16 /
bfloat16), the same segments and gathered keys go through one SDPA call per segment with the
bottom-right mask: exact, with autograd's backward, and the reference the flash path is held to.
A per-call or per-rollout micro-batch is one segment per sequence; a trie is one segment per
leaf (a DFS run goes on into a node's first child and ends at a leaf).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PathSegments:
    """A trie's queries split into segments, and each segment's keys (see the module docstring)."""

    query_starts: list[int]  # segment j's queries are query_starts[j] .. query_starts[j + 1] - 1
    ancestors: list[int]  # how many of segment j's keys precede its own tokens
    keys: torch.Tensor  # [K] long: every segment's keys, segment after segment
    key_starts: list[int]  # segment j's keys are keys[key_starts[j] : key_starts[j + 1]]

    @property
    def max_queries(self) -> int:
        return max(b - a for a, b in pairwise(self.query_starts))

    @property
    def max_keys(self) -> int:
        return max(b - a for a, b in pairwise(self.key_starts))

    @cached_property
    def masks(self) -> list[torch.Tensor]:
        """Per segment, [queries, keys] bool: query i sees keys 0 .. ancestors + i (the SDPA path's;
        built once per batch, shared by every layer)."""
        device = self.keys.device
        return [torch.arange(ke - ks, device=device)[None, :] <= before + torch.arange(qe - qs, device=device)[:, None]
                for (qs, qe), (ks, ke), before in zip(pairwise(self.query_starts), pairwise(self.key_starts),
                                                      self.ancestors, strict=True)]


def path_segments(end: torch.Tensor) -> PathSegments:
    n = end.numel()
    index = torch.arange(n, device=end.device)
    starts_at = torch.ones(n, dtype=torch.bool, device=end.device)
    starts_at[1:] = end[:-1] < index[1:]
    starts = [*index[starts_at].tolist(), n]
    keys, key_starts, ancestors = [], [0], []
    for s, e in pairwise(starts):
        before = index[:s][end[:s] >= s]  # the ancestors of s (DFS order: they come first)
        keys += [before, index[s:e]]
        ancestors.append(before.numel())
        key_starts.append(key_starts[-1] + before.numel() + e - s)
    return PathSegments(starts, ancestors, torch.cat(keys), key_starts)


def _flash_varlen(query, key, value, segments: PathSegments, scaling, dropout) -> torch.Tensor | None:
    """flash-attn's varlen call, or None where it cannot run here."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    device = query.device
    q = query[0].transpose(0, 1)  # [N, heads, dim]
    k = key[0].transpose(0, 1).index_select(0, segments.keys.to(device))
    v = value[0].transpose(0, 1).index_select(0, segments.keys.to(device))
    cu_q = torch.tensor(segments.query_starts, dtype=torch.int32, device=device)
    cu_k = torch.tensor(segments.key_starts, dtype=torch.int32, device=device)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, segments.max_queries, segments.max_keys,
                                 dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out[None]  # [1, N, heads, dim]


def varlen_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [1, heads, N, dim]; key/value: [1, kv_heads, N, dim] -> [1, N, heads, dim]."""
    segments: PathSegments = kwargs["tree"].path_segments()
    flash = _flash_varlen(query, key, value, segments, scaling, dropout)
    if flash is not None:
        return flash, None
    keys = segments.keys.to(query.device)
    gathered_k, gathered_v = key.index_select(2, keys), value.index_select(2, keys)
    out = []
    bounds = zip(pairwise(segments.query_starts), pairwise(segments.key_starts), segments.masks, strict=True)
    for (qs, qe), (ks, ke), mask in bounds:
        out.append(F.scaled_dot_product_attention(
            query[:, :, qs:qe], gathered_k[:, :, ks:ke], gathered_v[:, :, ks:ke], attn_mask=mask.to(query.device),
            dropout_p=dropout, scale=scaling, enable_gqa=True))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None
