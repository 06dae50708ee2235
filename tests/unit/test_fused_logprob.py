"""Fused chunked logprob + entropy (DESIGN section 8) against the naive log_softmax reference.

The backward is hand-written, so every test checks gradients (hidden, weight, bias) as well as
values, through a loss that mixes both outputs with random weights; ``gradcheck`` in float64 is
the strongest check of the derivation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arborl.kernels.fused_logprob import token_logprob_and_entropy

N, H, V = 37, 16, 53


def _inputs(n=N, h=H, v=V, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(v, (n,), generator=gen)
    a, c = torch.randn(2, n, generator=gen, dtype=torch.float64)
    return hidden, weight, b, targets, a, c


def _reference(hidden, weight, bias, targets, temperature=1.0):
    """The naive version: full fp32 (or fp64) logits, log_softmax, gather, -(p * log p).sum."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), entropy


def _values_and_grads(fn, hidden, weight, bias, a, c):
    """Outputs and the gradients of ``(a * logp).sum() + (c * entropy).sum()``."""
    logp, entropy = fn()
    loss = (a.to(logp.dtype) * logp).sum() + (c.to(entropy.dtype) * entropy).sum()
    params = [t for t in (hidden, weight, bias) if t is not None]
    return (logp.detach(), entropy.detach(), *torch.autograd.grad(loss, params))


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 16, 37, 64, 1024])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_fp32(chunk_size, with_bias):
    hidden, weight, bias, targets, a, c = _inputs(bias=with_bias)
    fused = _values_and_grads(
        lambda: token_logprob_and_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size),
        hidden,
        weight,
        bias,
        a,
        c,
    )
    naive = _values_and_grads(lambda: _reference(hidden, weight, bias, targets), hidden, weight, bias, a, c)
    assert fused[0].dtype == fused[1].dtype == torch.float32
    for got, want in zip(fused, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [7, 100])
def test_temperature(temperature, chunk_size):
    hidden, weight, bias, targets, a, c = _inputs()
    fused = _values_and_grads(
        lambda: token_logprob_and_entropy(
            hidden, weight, targets, bias=bias, chunk_size=chunk_size, temperature=temperature
        ),
        hidden,
        weight,
        bias,
        a,
        c,
    )
    naive = _values_and_grads(
        lambda: _reference(hidden, weight, bias, targets, temperature), hidden, weight, bias, a, c
    )
    for got, want in zip(fused, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_one_output_only(use):
    """An unused output reaches backward as None (entropy is often only logged); the other still matches."""
    hidden, weight, bias, targets, a, _ = _inputs()
    pick = 0 if use == "logp" else 1
    fused = token_logprob_and_entropy(hidden, weight, targets, bias=bias, chunk_size=10)[pick]
    naive = _reference(hidden, weight, bias, targets)[pick]
    got = torch.autograd.grad((a.float() * fused).sum(), [hidden, weight, bias])
    want = torch.autograd.grad((a.float() * naive).sum(), [hidden, weight, bias])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_fp32_outputs_close_to_fp32_reference():
    hidden, weight, bias, targets, a, c = _inputs(h=64, v=300, dtype=torch.bfloat16)
    fused = _values_and_grads(
        lambda: token_logprob_and_entropy(hidden, weight, targets, bias=bias, chunk_size=8),
        hidden,
        weight,
        bias,
        a,
        c,
    )
    # the reference sees the same bf16-rounded values, upcast: the fused kernel must be fp32-exact
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (hidden, weight, bias))
    naive = _values_and_grads(lambda: _reference(h32, w32, b32, targets), h32, w32, b32, a, c)
    assert fused[0].dtype == fused[1].dtype == torch.float32
    torch.testing.assert_close(fused[0], naive[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused[1], naive[1], rtol=1e-5, atol=1e-4)
    for got, want, param in zip(fused[2:], naive[2:], (hidden, weight, bias), strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == param.shape
        # only the final rounding of the gradient to bf16 differs (8 bits of mantissa)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_empty_input():
    hidden, weight, bias, _, _, _ = _inputs()
    empty = hidden.detach()[:0].requires_grad_()
    logp, entropy = token_logprob_and_entropy(empty, weight, torch.zeros(0, dtype=torch.long), bias=bias)
    assert logp.shape == entropy.shape == (0,)
    g_h, g_w, g_b = torch.autograd.grad((logp.sum() + entropy.sum()), [empty, weight, bias])
    assert g_h.shape == (0, H) and not g_w.any() and not g_b.any()


def test_no_grad_for_frozen_head():
    """A frozen head (weight.requires_grad False) only gets grad_hidden, still exact."""
    hidden, weight, _, targets, a, c = _inputs(bias=False)
    frozen = weight.detach()
    logp, entropy = token_logprob_and_entropy(hidden, frozen, targets, chunk_size=6)
    (got,) = torch.autograd.grad((a.float() * logp + c.float() * entropy).sum(), [hidden])
    ref_logp, ref_entropy = _reference(hidden, frozen, None, targets)
    (want,) = torch.autograd.grad((a.float() * ref_logp + c.float() * ref_entropy).sum(), [hidden])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_float64(temperature):
    hidden, weight, bias, targets, _, _ = _inputs(n=6, h=4, v=9, dtype=torch.float64)

    def fn(h, w, b):
        return token_logprob_and_entropy(h, w, targets, bias=b, chunk_size=4, temperature=temperature)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_rejects_bad_arguments():
    hidden, weight, _, targets, _, _ = _inputs()
    with pytest.raises(ValueError):
        token_logprob_and_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError):
        token_logprob_and_entropy(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError):
        token_logprob_and_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError):
        token_logprob_and_entropy(hidden, weight, targets[:3])
