"""One forward pass over a packed batch: every token's logprob (and entropy), read at its parent.

The model's decoder runs its own code over the flat tokens with ``position_ids`` = depths and
tree attention (``kernels.tree_attention``). The logprob of token t comes from the hidden state
at ``parent[t]``, the previous token on t's own path, so each call's tokens get exactly the
values a separate forward of that call would give them. The LM head is applied by the fused,
chunked kernel (``kernels.fused_logprob``), so the [tokens x vocab] logits never exist, and only
at the tokens asked for (``at``): the learner scores completion tokens, and in an agent's trie
most tokens are prompt and tool output, which the decoder must read but no loss scores. The head
is about a fifth of the default model's per-token work, so this is not a detail.

Invariant: a packed pass leaves the model on the attention implementation it found. Tree
attention needs the ``tree`` keyword only a packed call passes, so a model left on it fails its
next plain forward (``KeyError: 'tree'``); :func:`tree_attention` scopes it, exceptions included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from arborl.kernels.fused_logprob import token_logprob_and_entropy
from arborl.kernels.tree_attention import SDPA, TreeMask, register_tree_attention

from .packing import PackedBatch


def _attention_configs(model) -> list:
    """Every config whose ``_attn_implementation`` ``set_attn_implementation`` may change: the
    configs of the model and of its sub-models, and their sub-configs, each once."""
    from transformers import PreTrainedModel

    found: dict[int, object] = {}
    pending = [module.config for module in model.modules() if isinstance(module, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        pending += [sub for key in config.sub_configs if (sub := getattr(config, key, None)) is not None]
    return list(found.values())


@contextmanager
def tree_attention(model, attention: str) -> Iterator[None]:
    """Run ``model`` on the tree attention ``attention`` inside the block; on the way out every
    config of the model is back on the implementation it had (nested blocks restore each other's).

    Wrap the backward too where a forward may be recomputed in it (gradient checkpointing).
    """
    register_tree_attention()
    found = [(config, config._attn_implementation_internal) for config in _attention_configs(model)]
    try:
        if model.config._attn_implementation != attention:
            model.set_attn_implementation(attention)
        yield
    finally:
        # Set back as found, not through set_attn_implementation: that would re-check and adjust
        # the name (and walk the modules again); this is the exact inverse of what it changed.
        for config, implementation in found:
            config._attn_implementation_internal = implementation


def packed_logprobs_and_entropy(
    model, batch: PackedBatch, *, attention: str = SDPA, at: torch.Tensor | None = None, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logprob of each token given its path and the entropy of the distribution it was drawn
    from (both NaN at roots, which have no context): [N], or [len(at)] for the token indices ``at``.
    """
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    with tree_attention(model, attention):
        hidden = model.get_decoder()(
            input_ids=ids[None], position_ids=batch.position_ids.to(device)[None], tree=TreeMask(batch.end.to(device))
        ).last_hidden_state[0]
    parent = batch.parent.to(device)
    if at is not None:
        at = at.to(device)
        parent, ids = parent[at], ids[at]
    head = model.get_output_embeddings()
    logp, entropy = token_logprob_and_entropy(
        hidden[parent.clamp(min=0)], head.weight, ids, bias=head.bias, chunk_size=chunk_size
    )
    root = parent < 0
    nan = torch.full_like(logp, float("nan"))
    return torch.where(root, nan, logp), torch.where(root, nan, entropy)


def packed_token_logprobs(
    model, batch: PackedBatch, *, attention: str = SDPA, at: torch.Tensor | None = None
) -> torch.Tensor:
    """The logprob of each token given its path (NaN at roots): [N], or at the indices ``at``."""
    return packed_logprobs_and_entropy(model, batch, attention=attention, at=at)[0]
