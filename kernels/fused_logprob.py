"""Fused, chunked token logprob and entropy from hidden states and the LM head (DESIGN section 8).

The learner needs, per token, ``logp(target)`` and the entropy of the full softmax. Computing them
through ``log_softmax(hidden @ W.T)`` materialises [N, V] fp32 logits, several times over once
autograd keeps its intermediates (a 150k vocabulary at 32k tokens is 19 GB per copy). Here a
``torch.autograd.Function`` walks the tokens in chunks of ``chunk_size``: the forward keeps only
the per-token logsumexp and entropy (O(N)), and the backward recomputes each chunk's logits and
folds the gradient straight into ``grad_hidden`` and ``grad_weight``. Peak extra memory is about
two [chunk_size, V] fp32 buffers, plus an fp32 copy of the weight when it is not fp32 already.

With ``z = (hidden @ W.T + b) / T``, ``L = logsumexp(z)``, ``log p = z - L``:

- ``logp_y = z_y - L``, so ``d logp_y / dz_j = 1[j = y] - p_j``;
- ``H = -sum_i p_i log p_i``. With ``dp_i/dz_j = p_i (1[i = j] - p_j)``,
  ``dH/dz_j = -sum_i p_i (1[i = j] - p_j)(log p_i + 1) = -p_j (log p_j + 1) + p_j (1 - H)
  = -p_j (log p_j + H)``;
- hence ``grad_z = g_logp (onehot(y) - p) - g_H p (log p + H)``
  ``= g_logp onehot(y) - p (g_logp + g_H (log p + H))``; the raw logits ``u = hidden @ W.T + b`` get
  ``grad_u = grad_z / T``, so ``grad_hidden = grad_u @ W``, ``grad_W = sum over chunks of
  grad_u.T @ hidden``, ``grad_b = sum of grad_u``.

An output that takes no part in the loss reaches backward as None (entropy is often only logged)
and its term is skipped. The backward is not itself differentiable (no double backward).

Precision: logits are computed from inputs upcast to fp32 (``hidden_chunk.float() @ W.float().T``),
not by a bf16 matmul that is upcast afterwards: bf16 logits keep ~3 significant digits (an error
of ~0.06 at a logit of 20), which would leak straight into ``logp``. The outputs are fp32 (fp64 for
fp64 inputs, which is what ``gradcheck`` needs). Logits must be finite (an ``-inf`` bias would
turn ``p log p`` into NaN).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["token_logprob_and_entropy"]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (never a downcast)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def _chunk_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Scaled logits z of one chunk, [C, V] in ``dtype``; ``weight`` and ``bias`` already in ``dtype``."""
    z = hidden.to(dtype) @ weight.T
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    return z


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, chunk_size, temperature):
        dtype = _compute_dtype(hidden, weight, bias)
        n = hidden.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        logp = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy = torch.empty(n, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            z = _chunk_logits(hidden[start:stop], w, b, temperature, dtype)
            # logsumexp by hand, so that one exp pass serves both L and p, and no third buffer is made
            peak = z.amax(dim=-1, keepdim=True)
            z -= peak
            p = z.exp()
            total = p.sum(dim=-1, keepdim=True)
            p /= total
            log_total = total.log_()
            z -= log_total  # z now holds log p
            logp[start:stop] = z.gather(1, targets[start:stop, None]).squeeze(1)
            entropy[start:stop] = -p.mul_(z).sum(-1)
            lse[start:stop] = (peak + log_total).squeeze(1)
            del z, p
        ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
        ctx.chunk_size, ctx.temperature, ctx.dtype = chunk_size, temperature, dtype
        # entropy is often only logged: without materialised grads its term is skipped in backward
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        need_b = need_b and bias is not None
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None, None
        dtype, chunk_size, temperature = ctx.dtype, ctx.chunk_size, ctx.temperature
        n = hidden.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            z = _chunk_logits(hidden[start:stop], w, b, temperature, dtype)
            z -= lse[start:stop, None]  # log p
            p = z.exp()
            # grad_z = g_logp * onehot(y) - p * (g_logp + g_H * (log p + H)), in z's or p's buffer
            if g_entropy is None:
                del z
                grad_z = p.mul_(-g_logp[start:stop, None])
            else:
                z += entropy[start:stop, None]
                z *= g_entropy[start:stop, None]
                if g_logp is not None:
                    z += g_logp[start:stop, None]
                grad_z = z.mul_(p).neg_()
            del p
            if g_logp is not None:
                grad_z.scatter_add_(1, targets[start:stop, None], g_logp[start:stop, None].to(dtype))
            if temperature != 1.0:
                grad_z /= temperature  # d z / d (hidden @ W.T + b) = 1 / T
            if need_h:
                grad_h[start:stop] = grad_z @ w
            if need_w:
                grad_w.addmm_(grad_z.T, hidden[start:stop].to(dtype))
            if need_b:
                grad_b += grad_z.sum(0)
            del grad_z
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
        )


def token_logprob_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp[target], entropy)`` per token of ``softmax((hidden @ weight.T + bias) / temperature)``.

    hidden [N, H], weight [V, H] (the LM head), targets [N] (int64), bias [V] or None. Returns two
    [N] tensors in fp32 (fp64 for fp64 inputs), differentiable in hidden, weight and bias, without
    ever holding more than ``chunk_size`` rows of logits.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _FusedLogprobEntropy.apply(
        hidden, weight, targets.long(), bias, int(chunk_size), float(temperature)
    )
