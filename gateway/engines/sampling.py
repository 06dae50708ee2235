"""Turning one row of logits into a sampled token and its logprob.

The logprob returned is the one a learner needs to compare against: the log-probability of
the token under the distribution it was really drawn from (see ``SamplingParams``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


class NoAllowedToken(RuntimeError):
    """Under a constraint, no token the distribution can produce is allowed."""


# Constrained sampling rejects at most this many draws, then takes the likeliest allowed token.
MAX_REJECTIONS = 16


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
    allowed: Callable[[int], bool] | None = None, shortlist: Sequence[int] | None = None,
) -> tuple[int, float, tuple[tuple[int, float], ...]]:
    """Sample from one [vocab] row: (token id, its logprob, the top ``params.top_logprobs``).

    With ``allowed`` (a constraint on the next token) a drawn token that is not allowed is masked
    out and the draw repeated, which samples from the distribution restricted to allowed tokens;
    after ``MAX_REJECTIONS`` the likeliest allowed token is taken. The logprob reported is under
    the distribution renormalised over the tokens not rejected (tokens never tested count as
    allowed: it is at most the exact constrained logprob, and equal when nothing was rejected).
    """
    logprobs = sampling_logprobs(logits, params)
    if allowed is not None:
        token, logprobs = _sample_allowed(logprobs, is_greedy(params), generator, allowed, shortlist)
    elif is_greedy(params):
        token = int(torch.argmax(logprobs))
    else:
        token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs > 0:
        values, ids = torch.topk(logprobs, min(params.top_logprobs, logprobs.shape[-1]))
        # Tokens cut by top-k/top-p have probability 0; report OpenAI's -9999.0, not -inf (not JSON).
        top = tuple((int(i), max(float(v), IMPOSSIBLE_LOGPROB)) for i, v in zip(ids, values, strict=True))
    return token, float(logprobs[token]), top


def _sample_allowed(
    logprobs: torch.Tensor, greedy: bool, generator: torch.Generator | None, allowed: Callable[[int], bool],
    shortlist: Sequence[int] | None,
) -> tuple[int, torch.Tensor]:
    """A token ``allowed`` accepts, and the logprobs it was drawn from (renormalised)."""
    masked = logprobs.clone()
    if shortlist is not None:  # nothing else can be allowed: sample among these alone
        keep = torch.full_like(masked, float("-inf"))
        index = torch.as_tensor(list(shortlist), dtype=torch.long)
        keep[index] = masked[index]
        masked = keep
    for _ in range(MAX_REJECTIONS):
        if torch.isneginf(masked).all():
            raise NoAllowedToken("no token is allowed")
        token = int(torch.argmax(masked)) if greedy else int(torch.multinomial(masked.exp(), 1, generator=generator))
        if allowed(token):
            return token, torch.log_softmax(masked, dim=-1)
        masked[token] = float("-inf")
    for candidate in torch.argsort(masked, descending=True).tolist():
        if torch.isneginf(masked[candidate]):
            break
        if allowed(candidate):
            return candidate, torch.log_softmax(masked, dim=-1)
    raise NoAllowedToken("no token is allowed")
