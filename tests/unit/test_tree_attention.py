"""Block-sparse tree attention (``arborl_tree_blocks``, DESIGN section 8) against the dense mask.

The blocks path must give the dense SDPA path's output and input gradients on any DFS tree
(ragged last block, a single block, GQA, rows that see only themselves), while computing
scores only for the keys each query block can see.
"""

from __future__ import annotations

import random

import pytest
import torch

from arborl.kernels.tree_attention import BLOCKS, SDPA, TreeMask, register_tree_attention, tree_mask
from arborl.learner.packing import CallSpan, pack
from arborl.rollout.trie import Trie


def _random_end(rng: random.Random, tries: int = 2, paths: int = 6) -> torch.Tensor:
    """``end`` of a batch packing several random tries; paths branch off earlier ones at random depths."""
    pieces = []
    for _ in range(tries):
        trie, calls, made = Trie(), [], []
        for i in range(paths):
            base = rng.choice(made) if made and rng.random() < 0.8 else []
            path = base[: rng.randint(0, len(base))] + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
            made.append(path)
            calls.append(CallSpan(i, trie.insert(path).leaf, 1))
        pieces.append((trie, calls))
    return pack(pieces).end


def _attention(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register_tree_attention()
    return ALL_ATTENTION_FUNCTIONS[name]


def _output_and_grads(name: str, tree: TreeMask, q, k, v, grad_out):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = _attention(name)(None, q, k, v, None, scaling=0.3, tree=tree)
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


def _assert_blocks_equal_dense(
    end: torch.Tensor, block_size: int, heads: int, kv_heads: int, seed: int
) -> None:
    n, dim = end.numel(), 8
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, n, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(1, n, heads, dim, generator=generator, dtype=torch.float64)
    dense = _output_and_grads(SDPA, TreeMask(end), q, k, v, grad_out)
    blocks = _output_and_grads(BLOCKS, TreeMask(end, block_size=block_size), q, k, v, grad_out)
    for a, b in zip(blocks, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (3, 3)])
def test_blocks_equal_dense_sdpa_on_random_trees(seed: int, heads: int, kv_heads: int):
    end = _random_end(random.Random(seed))
    block_size = next(b for b in (7, 6, 5, 11) if end.numel() % b)  # a ragged last block
    _assert_blocks_equal_dense(end, block_size, heads, kv_heads, seed)


def test_blocks_equal_dense_sdpa_in_a_single_block():
    end = _random_end(random.Random(0))
    _assert_blocks_equal_dense(end, end.numel() + 5, 4, 2, 0)


def test_rows_that_see_only_themselves():
    """Every token a root of its own: each query attends to its own key only, so out = v."""
    end = torch.arange(20)
    _assert_blocks_equal_dense(end, 6, 4, 2, 0)
    q = torch.randn(1, 4, 20, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64) for _ in range(2))
    out, _ = _attention(BLOCKS)(None, q, k, v, None, tree=TreeMask(end, block_size=6))
    torch.testing.assert_close(
        out, v.repeat_interleave(2, dim=1).transpose(1, 2)
    )  # query head h reads kv head h // 2


def test_block_selection_skips_the_sibling_branches():
    """A shared prefix and eight long sibling branches: each query block visits the prefix and its
    own branch only, so the computed scores track the real (per-path) work, far below N * N."""
    block_size, prefix, branch = 16, 32, 64
    trie = Trie()
    calls = [
        CallSpan(b, trie.insert(list(range(prefix)) + [100 + b] * branch).leaf, branch) for b in range(8)
    ]
    end = pack([(trie, calls)]).end
    n = end.numel()
    blocks = TreeMask(end, block_size=block_size).query_blocks()

    # The tiles hold the dense mask exactly, and every selected key is seen by some query.
    dense = tree_mask(end)
    starts = range(0, n, block_size)
    for qs, keys, tile in zip(starts, blocks.keys.split(blocks.sizes), blocks.tiles, strict=True):
        assert torch.equal(dense[qs : qs + block_size, keys], tile) and tile.any(0).all()
        assert dense[qs : qs + block_size].sum() == tile.sum()

    pairs = sum(len(set((keys // block_size).tolist())) for keys in blocks.keys.split(blocks.sizes))
    query_blocks = len(starts)
    assert pairs < 0.3 * query_blocks * (query_blocks + 1) / 2  # vs every causal (query, key) block pair
    assert blocks.scores < 0.15 * n * n  # about 1 / 8: each branch sees the prefix, not its siblings
    assert blocks.scores < 1.3 * dense.sum()  # close to the per-path work itself
