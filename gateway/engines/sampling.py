"""Turning one row of logits into a sampled token and its logprob.

The logprob returned is the one a learner needs to compare against: the log-probability of
the token under the distribution it was really drawn from (see ``SamplingParams``).
"""

from __future__ import annotations

import torch

from .base import SamplingParams

# Below this temperature, logits / T overflows float32 for ordinary logit gaps: sample greedily.
MIN_TEMPERATURE = 1e-4
IMPOSSIBLE_LOGPROB = -9999.0


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_TEMPERATURE


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution a token is drawn from, for a [vocab] float row.

    Tokens removed by top-k / top-p get ``-inf``.
    """
    logits = logits.float()
    if is_greedy(params):
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    logprobs = torch.log_softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_lp, order = torch.sort(logprobs, descending=True)
        cumulative = torch.cumsum(sorted_lp.exp(), dim=-1)
        # Keep a token if the mass before it is below top_p: the smallest set reaching top_p.
        drop_sorted = (cumulative - sorted_lp.exp()) >= params.top_p
        drop_sorted[0] = False  # the most likely token always stays, whatever the rounding
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, float, tuple[tuple[int, float], ...]]:
    """Sample from one [vocab] row: (token id, its logprob, the top ``params.top_logprobs``)."""
    logprobs = sampling_logprobs(logits, params)
    if is_greedy(params):
        token = int(torch.argmax(logprobs))
    else:
        token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs > 0:
        values, ids = torch.topk(logprobs, min(params.top_logprobs, logprobs.shape[-1]))
        # Tokens cut by top-k/top-p have probability 0; report OpenAI's -9999.0, not -inf (not JSON).
        top = tuple((int(i), max(float(v), IMPOSSIBLE_LOGPROB)) for i, v in zip(ids, values, strict=True))
    return token, float(logprobs[token]), top
