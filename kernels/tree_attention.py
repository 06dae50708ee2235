"""Tree attention for DFS-flattened tries (DESIGN sections 4 and 8), inside any transformers model.

Query q may attend to key k iff ``k <= q <= end[k]``: k is q itself or one of its ancestors,
because in DFS pre-order an ancestor comes first and its subtree (which holds q) ends at
``end[k]``. Four implementations, registered with transformers' ``AttentionInterface`` so a
Llama / Qwen-family model trains on packed tries with its own modelling code:

- ``arborl_tree_sdpa``: the dense [N, N] boolean mask through ``scaled_dot_product_attention``;
  simple, exact, with a backward everywhere; O(N^2) compute and memory. For small inputs, and as
  the reference the others are tested against.
- ``arborl_tree_blocks``: the same SDPA call per block of queries, over only the keys that block
  can see (its tokens' ancestors). Plain PyTorch, so autograd gives the backward on any device;
  the cost follows the real per-path work instead of N^2. For training long packs on the CPU,
  and on CUDA where FlexAttention is unavailable.
- ``arborl_tree_flex``: FlexAttention with the mask as a ``mask_mod`` and a block mask (O(N)
  metadata); on CUDA it trains long packs. PyTorch has no FlexAttention backward on the CPU,
  so there it serves forward-only passes (logp_old, MCLA).
- ``arborl_tree_varlen``: the trie as variable-length causal attention over path segments
  (``kernels.tree_varlen``): flash-attn's varlen kernel on CUDA in half precision, per-segment
  SDPA elsewhere.

Call the model with ``position_ids`` = depths and ``tree=TreeMask(end)`` as a keyword argument;
transformers hands keyword arguments through to the attention function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .tree_varlen import PathSegments, path_segments, varlen_tree_attention

SDPA = "arborl_tree_sdpa"
FLEX = "arborl_tree_flex"
BLOCKS = "arborl_tree_blocks"
VARLEN = "arborl_tree_varlen"

# Queries per block of ``arborl_tree_blocks``. Smaller blocks select fewer keys (closer to the
# exact per-path work) but make more, smaller SDPA calls. On 2 CPU threads, an 8k-token pack (a
# 1k prefix, 8 branches) took 0.94 s forward+backward at 256, 1.06 s at 512, 1.17 s at 128,
# against 5.7 s for the dense mask. Read when a TreeMask is built, so tests can lower it.
BLOCK_SIZE = 256


def tree_mask(end: torch.Tensor) -> torch.Tensor:
    """The dense mask: ``mask[q, k] = (k <= q) & (q <= end[k])``."""
    index = torch.arange(end.numel(), device=end.device)
    q, k = index[:, None], index[None, :]
    return (k <= q) & (q <= end[None, :])


@dataclass(frozen=True)
class QueryBlocks:
    """What ``arborl_tree_blocks`` computes: for each block of queries, the keys it can see."""

    block_size: int
    keys: torch.Tensor  # [S] long: every block's selected keys, block after block
    sizes: list[int]  # how many of ``keys`` belong to each block
    tiles: list[torch.Tensor]  # per block: [queries, selected keys] bool mask

    @property
    def scores(self) -> int:
        """Attention scores computed, against N * N for the dense mask."""
        return sum(tile.numel() for tile in self.tiles)


def query_blocks(end: torch.Tensor, block_size: int) -> QueryBlocks:
    """Select, for each query block [qs, qe), the keys k < qe with ``end[k] >= qs``.

    Exactly the keys some query of the block attends to: a key inside the block is seen by
    itself, and for a key before the block, DFS order makes ``end[k] >= qs`` mean that qs lies
    in k's subtree, so k is an ancestor of qs. (The same test on whole key blocks,
    ``max(end[ks:ke]) >= qs``, would be exact about which blocks to visit but would still
    compute every key of a visited block; testing single keys costs nothing more.)
    In DFS order these keys are the block's ancestors: a few contiguous runs, as many as the
    trie nodes on the path to the block, so a block costs about its path length, not N.
    """
    index = torch.arange(end.numel(), device=end.device)
    keys, tiles = [], []
    for qs in range(0, end.numel(), block_size):
        qe = min(qs + block_size, end.numel())
        selected = index[:qe][end[:qe] >= qs]
        q = index[qs:qe, None]
        keys.append(selected)
        tiles.append((selected <= q) & (q <= end[selected]))
    return QueryBlocks(block_size, torch.cat(keys), [k.numel() for k in keys], tiles)


@dataclass
class TreeMask:
    """The tree of one flattened batch; the masks are built once and shared by every layer."""

    end: torch.Tensor
    block_size: int = field(default_factory=lambda: BLOCK_SIZE)  # for arborl_tree_blocks
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _block: Any = field(default=None, repr=False)
    _query_blocks: QueryBlocks | None = field(default=None, repr=False)
    _path_segments: PathSegments | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = tree_mask(self.end)
        return self._dense

    def query_blocks(self) -> QueryBlocks:
        if self._query_blocks is None:
            self._query_blocks = query_blocks(self.end, self.block_size)
        return self._query_blocks

    def path_segments(self) -> PathSegments:
        if self._path_segments is None:
            self._path_segments = path_segments(self.end)
        return self._path_segments

    def block_mask(self):
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            end = self.end

            def mask_mod(b, h, q, kv):
                return (kv <= q) & (q <= end[kv])

            n = end.numel()
            self._block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=end.device)
        return self._block


def _sdpa_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query: [1, heads, N, dim]; key/value: [1, kv_heads, N, dim] -> [1, N, heads, dim]."""
    mask = kwargs["tree"].dense()[None, None]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _flex_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    tree: TreeMask = kwargs["tree"]
    out = flex_attention(query, key, value, block_mask=tree.block_mask(), scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _blocks_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense SDPA per query block over its ancestor keys only (see ``query_blocks``)."""
    blocks = kwargs["tree"].query_blocks()
    # One gather for all blocks (its backward is a single index_add), then views per block.
    keys = key.index_select(2, blocks.keys).split(blocks.sizes, dim=2)
    values = value.index_select(2, blocks.keys).split(blocks.sizes, dim=2)
    queries = query.split(blocks.block_size, dim=2)
    out = [
        F.scaled_dot_product_attention(
            q, k, v, attn_mask=tile, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        for q, k, v, tile in zip(queries, keys, values, blocks.tiles, strict=True)
    ]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


_FUNCTIONS = {SDPA: _sdpa_tree_attention, BLOCKS: _blocks_tree_attention, FLEX: _flex_tree_attention,
              VARLEN: varlen_tree_attention}


def tree_attention_function(name: str):
    """The implementation ``name`` as a plain function, for models outside transformers (the
    megatron backend): ``f(None, query, key, value, None, scaling=s, tree=TreeMask)`` with query
    [1, heads, N, dim] and key/value [1, kv_heads, N, dim] returns ([1, N, heads, dim], None)."""
    return _FUNCTIONS[name]


_registered = False


def register_tree_attention() -> None:
    """Make the ``attn_implementation``s SDPA, BLOCKS, FLEX and VARLEN available (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, function in _FUNCTIONS.items():
        AttentionInterface.register(name, function)
        # The tree mask replaces the model's causal mask; skip building that.
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    _registered = True
