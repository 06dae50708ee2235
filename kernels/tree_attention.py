"""Tree attention for DFS-flattened tries (DESIGN sections 4 and 8), inside any transformers model.

Query q may attend to key k iff ``k <= q <= end[k]``: k is q itself or one of its ancestors,
because in DFS pre-order an ancestor comes first and its subtree (which holds q) ends at
``end[k]``. Two implementations, registered with transformers' ``AttentionInterface`` so a
Llama / Qwen-family model trains on packed tries with its own modelling code:

- ``arborl_tree_sdpa``: the dense [N, N] boolean mask through ``scaled_dot_product_attention``;
  simple, exact, with a backward everywhere; O(N^2) memory, for small inputs and CPU training.
- ``arborl_tree_flex``: FlexAttention with the mask as a ``mask_mod`` and a block mask (O(N)
  metadata); on CUDA it trains long packs. PyTorch has no FlexAttention backward on the CPU,
  so there it serves forward-only passes (logp_old, MCLA).

Call the model with ``position_ids`` = depths and ``tree=TreeMask(end)`` as a keyword argument;
transformers hands keyword arguments through to the attention function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SDPA = "arborl_tree_sdpa"
FLEX = "arborl_tree_flex"


def tree_mask(end: torch.Tensor) -> torch.Tensor:
    """The dense mask: ``mask[q, k] = (k <= q) & (q <= end[k])``."""
    index = torch.arange(end.numel(), device=end.device)
    q, k = index[:, None], index[None, :]
    return (k <= q) & (q <= end[None, :])


@dataclass
class TreeMask:
    """The tree of one flattened batch; the masks are built once and shared by every layer."""

    end: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _block: Any = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = tree_mask(self.end)
        return self._dense

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
    tree: TreeMask = kwargs["tree"]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=tree.dense()[None, None], dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _flex_tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    tree: TreeMask = kwargs["tree"]
    out = flex_attention(query, key, value, block_mask=tree.block_mask(), scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_tree_attention() -> None:
    """Make ``attn_implementation`` ``arborl_tree_sdpa`` / ``arborl_tree_flex`` available (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, function in ((SDPA, _sdpa_tree_attention), (FLEX, _flex_tree_attention)):
        AttentionInterface.register(name, function)
        # The tree mask replaces the model's causal mask; skip building that.
        AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    _registered = True
