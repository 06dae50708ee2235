"""Block-sparse tree attention (``arborl_tree_blocks``, DESIGN section 8) against the dense mask.

The blocks path must give the dense SDPA path's output and input gradients on any DFS tree
(ragged last block, a single block, GQA, rows that see only themselves), while computing
scores only for the keys each query block can see.
"""

from __future__ import annotations

import random

import pytest
import torch

from arborl.kernels.tree_attention import BLOCKS, SDPA, VARLEN, TreeMask, register_tree_attention, tree_mask
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


def _assert_equals_dense(name: str, tree: TreeMask, heads: int, kv_heads: int, seed: int) -> None:
    """Implementation ``name`` gives the dense mask's output and input gradients (float64)."""
    n, dim = tree.end.numel(), 8
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, n, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(1, n, heads, dim, generator=generator, dtype=torch.float64)
    dense = _output_and_grads(SDPA, TreeMask(tree.end), q, k, v, grad_out)
    ours = _output_and_grads(name, tree, q, k, v, grad_out)
    for a, b in zip(ours, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _assert_blocks_equal_dense(end: torch.Tensor, block_size: int, heads: int, kv_heads: int, seed: int) -> None:
    _assert_equals_dense(BLOCKS, TreeMask(end, block_size=block_size), heads, kv_heads, seed)


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


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (3, 3)])
def test_varlen_equals_dense_sdpa_on_random_trees(seed: int, heads: int, kv_heads: int):
    _assert_equals_dense(VARLEN, TreeMask(_random_end(random.Random(seed))), heads, kv_heads, seed)
    _assert_equals_dense(VARLEN, TreeMask(torch.arange(9)), heads, kv_heads, seed)  # every token a root


def test_path_segments_are_the_trie_branches_and_their_keys_the_ancestors():
    """A shared prefix and three branches, one of which branches again: a segment per leaf (a DFS
    run goes on into a node's first child and ends at a leaf), and each segment's keys are exactly
    the dense mask's keys of its last query."""
    trie = Trie()
    paths = [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7, 8], [1, 2, 3, 6, 9], [1, 2, 10]]
    calls = [CallSpan(i, trie.insert(path).leaf, 1) for i, path in enumerate(paths)]
    end = pack([(trie, calls)]).end
    segments = TreeMask(end).path_segments()
    assert len(segments.ancestors) == len(paths)  # 1 2 3 4 5 | 6 7 8 | 9 | 10
    dense = tree_mask(end)
    for j, (qs, qe) in enumerate(zip(segments.query_starts, segments.query_starts[1:], strict=False)):
        keys = segments.keys[segments.key_starts[j]:segments.key_starts[j + 1]]
        assert torch.equal(keys, dense[qe - 1].nonzero()[:, 0])  # the last query sees all of them
        assert segments.ancestors[j] == keys.numel() - (qe - qs)


@pytest.mark.gpu
def test_varlen_runs_flash_attn_in_bfloat16_on_cuda():
    """The flash-attn path (taken, not fallen back from) against the dense mask in float32."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from arborl.kernels.tree_varlen import _flash_varlen

    end = _random_end(random.Random(0)).cuda()
    n, dim = end.numel(), 64
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, n, dim, generator=generator, device="cuda")
    k, v = (torch.randn(1, 2, n, dim, generator=generator, device="cuda") for _ in range(2))
    grad_out = torch.randn(1, n, 4, dim, generator=generator, device="cuda")
    half = [t.bfloat16() for t in (q, k, v)]
    assert _flash_varlen(*half, TreeMask(end).path_segments(), 0.125, 0.0) is not None
    dense = _output_and_grads(SDPA, TreeMask(end), q, k, v, grad_out)
    flash = _output_and_grads(VARLEN, TreeMask(end), *half, grad_out.bfloat16())
    for a, b in zip(flash, dense, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)
