"""One forward pass over a packed batch: every token's logprob, read at its parent.

The model runs its own code over the flat tokens with ``position_ids`` = depths and tree
attention (``kernels.tree_attention``); the logprob of token t is taken from the logits at
``parent[t]``, the previous token on t's own path, so each call's tokens get exactly the values
a separate forward of that call would give them.
"""

from __future__ import annotations

import torch

from arborl.kernels.tree_attention import SDPA, TreeMask, register_tree_attention

from .packing import PackedBatch


def packed_token_logprobs(model, batch: PackedBatch, *, attention: str = SDPA) -> torch.Tensor:
    """[N] logprob of each token given its path (NaN at roots, which have no context)."""
    register_tree_attention()
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    logits = model(
        input_ids=ids[None], position_ids=batch.position_ids.to(device)[None], tree=TreeMask(batch.end.to(device))
    ).logits[0]
    parent = batch.parent.to(device)
    has_parent = parent >= 0
    rows = torch.log_softmax(logits[parent.clamp(min=0)], dim=-1)
    logp = rows.gather(-1, ids[:, None])[:, 0]
    return torch.where(has_parent, logp, torch.full_like(logp, float("nan")))
