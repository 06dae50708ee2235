"""Sampling distributions, stop strings, and the prefix cache's bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arborl.gateway.engines.base import SamplingParams
from arborl.gateway.engines.detokenizer import IncrementalDetokenizer
from arborl.gateway.engines.kv_cache import KVLayout, PrefixCache, SequenceKV
from arborl.gateway.engines.sampling import sample_token, sampling_logprobs


def test_temperature_logprob_is_of_the_scaled_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    lp = sampling_logprobs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1))
    greedy = sampling_logprobs(logits, SamplingParams(temperature=0))
    assert torch.allclose(greedy, torch.log_softmax(logits, -1))


def test_top_k_and_top_p_renormalise():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    top_k = sampling_logprobs(logits, SamplingParams(top_k=2)).exp()
    assert torch.allclose(top_k, torch.tensor([0.625, 0.375, 0, 0]))
    top_p = sampling_logprobs(logits, SamplingParams(top_p=0.7)).exp()
    assert torch.allclose(top_p, torch.tensor([0.625, 0.375, 0, 0]))  # 0.5 < 0.7, 0.8 >= 0.7


def test_sampling_follows_the_distribution_and_seed():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0)
    draws = [sample_token(logits, params, torch.Generator().manual_seed(i))[0] for i in range(2000)]
    assert np.bincount(draws, minlength=3) / 2000 == pytest.approx([0.7, 0.2, 0.1], abs=0.04)
    token, logprob, _ = sample_token(logits, params, torch.Generator().manual_seed(1))
    assert logprob == pytest.approx(math.log([0.7, 0.2, 0.1][token]), abs=1e-6)


class _CharTokenizer:
    """One character per id, so stop-string handling is easy to reason about."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize(
    ("text", "stop", "shown", "matched"),
    [
        ("hello END world", ["END"], "hello ", "END"),
        ("hello EN", ["END"], "hello EN", None),  # a partial stop is released at the end
        ("abc", [], "abc", None),
        ("x<tool>y", ["</tool>", "<tool>"], "x", "<tool>"),
    ],
)
def test_stop_strings(text, stop, shown, matched):
    detok = IncrementalDetokenizer(_CharTokenizer(), stop)
    out = ""
    for ch in text:
        out += detok.add(ord(ch))
        if detok.matched_stop:
            break
    out += "" if detok.matched_stop else detok.flush()
    assert out == shown
    assert detok.matched_stop == matched


def _kv(tokens: int) -> SequenceKV:
    kv = SequenceKV(KVLayout(2, 1, 4, torch.float32, torch.device("cpu")), capacity=tokens)
    kv.length = tokens
    return kv


def test_prefix_cache_longest_match_and_eviction():
    cache = PrefixCache(capacity_tokens=25)
    cache.store("a", list(range(10)), _kv(10))
    cache.store("b", [0, 1, 2, 9, 9, 9, 9, 9, 9, 9], _kv(10))
    entry, hit = cache.lookup([0, 1, 2, 3, 4, 7], key=None)
    assert hit == 5 and entry is not None
    # the last prompt token is never served from the cache: its logits are needed
    assert cache.lookup(list(range(10)), key="a")[1] == 9
    cache.lookup([0, 1, 2, 9], key="b")  # b used more recently than a
    cache.store("c", [5] * 10, _kv(10))  # 30 > 25 tokens: evict the least recently used (a)
    assert cache.cached_tokens == 20
    assert cache.lookup(list(range(6)), key=None)[1] == 3  # only b's [0,1,2] is left


@pytest.mark.parametrize("params", [SamplingParams(top_p=1e-300), SamplingParams(temperature=1e-300),
                                    SamplingParams(temperature=2.0, top_k=1)])
def test_extreme_parameters_still_sample_the_top_token(params):
    logits = torch.tensor([0.1, 3.0, 0.2, -50.0])
    token, logprob, _ = sample_token(logits, params, torch.Generator().manual_seed(0))
    assert token == 1 and math.isfinite(logprob)


def test_top_logprobs_outside_the_support_are_finite():
    logits = torch.tensor([3.0, 1.0, 0.0])
    _, _, top = sample_token(logits, SamplingParams(top_k=1, top_logprobs=3), torch.Generator().manual_seed(0))
    assert top[0][0] == 0
    assert all(math.isfinite(lp) for _, lp in top) and top[1][1] == -9999.0


def test_constrained_sampling_draws_only_allowed_tokens_and_reports_their_constrained_logprob():
    from arborl.gateway.engines.sampling import NoAllowedToken

    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    allowed = {1, 3}
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        token, logprob, _ = sample_token(logits, params, generator, lambda t: t in allowed)
        seen.add(token)
        assert token in allowed and logprob <= 0
    assert seen == allowed
    # Among the shortlist only, the constrained logprob is exact: log p(t) / sum over the allowed.
    token, logprob, _ = sample_token(logits, SamplingParams(temperature=0.0), generator,
                                     lambda t: t in allowed, shortlist=[1, 3])
    exact = torch.log_softmax(logits[[1, 3]], dim=-1)[0]
    assert token == 1 and math.isclose(logprob, float(exact), rel_tol=1e-6)
    with pytest.raises(NoAllowedToken):
        sample_token(logits, params, generator, lambda t: False)
