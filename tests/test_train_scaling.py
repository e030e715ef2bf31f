"""Training at scale (issue 22): grouped-GEMM experts and fused attention against the plain paths they replace,
gradients included; activation checkpointing; validation files; throughput, MFU and memory metrics."""

from __future__ import annotations

import json

import pytest
import torch

from gptoss.config import preset
from gptoss.model import attention_mask, grouped_experts, materialized_sdpa_with_sinks, swiglu, trainable_sdpa_with_sinks


def loop_experts(t, experts, weights, w1, b1, w2, b2, alpha, limit):
    """The reference: one expert at a time, as the prefill path did before grouped GEMMs."""
    out = torch.zeros(t.shape[0], w2.shape[1], dtype=torch.float32)
    for e in range(w1.shape[0]):
        token, slot = (experts == e).nonzero(as_tuple=True)
        h = swiglu(torch.nn.functional.linear(t[token], w1[e], b1[e]), alpha, limit)
        y = torch.nn.functional.linear(h, w2[e], b2[e])
        out = out.index_add(0, token, y.float() * weights[token, slot, None])
    return out


def test_grouped_experts_equal_the_per_expert_loop_with_gradients():
    g = torch.Generator().manual_seed(0)
    N, k, E, D, I = 40, 2, 4, 32, 32
    params = [torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, 2 * I, generator=g) * 0.1,
              torch.randn(E, D, I, generator=g) * 0.2, torch.randn(E, D, generator=g) * 0.1]
    t = torch.randn(N, D, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    experts[3, 1] = experts[7, 0] = -1  # dropped for capacity
    experts[:, 0][experts[:, 0] == 3] = 2  # expert 3 gets only second choices: uneven group sizes
    weights = torch.softmax(torch.randn(N, k, generator=g), -1)
    grad = torch.randn(N, D, generator=g)
    outs, grads = [], []
    for fn in (loop_experts, grouped_experts):
        leaves = [p.clone().requires_grad_(True) for p in [t, *params]]
        out = fn(leaves[0], experts, weights, *leaves[1:], 1.702, 7.0)
        out.backward(grad)
        outs.append(out.detach())
        grads.append([p.grad for p in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads[1][1][:, ::2].abs().sum() > 0  # gradients reach the experts' gate columns


@pytest.mark.parametrize("window,sinks,segments", [(8, True, True), (None, True, False), (None, False, True)])
def test_fused_training_attention_equals_the_materialized_one(window, sinks, segments):
    g = torch.Generator().manual_seed(1)
    B, T, K, G, Dh = 2, 150, 2, 2, 16  # T spans three query tiles, the last one partial
    q = torch.randn(B, T, K, G, Dh, generator=g, requires_grad=True)
    k = torch.randn(B, T, K, Dh, generator=g, requires_grad=True)
    v = torch.randn(B, T, K, Dh, generator=g, requires_grad=True)
    s = torch.randn(K * G, generator=g, requires_grad=True) if sinks else None
    pos = torch.arange(T).expand(B, T)
    seg = (torch.arange(T) >= 70).long().expand(B, T) if segments else None
    if segments:  # packed documents: positions restart in the second one
        pos = torch.where(seg == 1, torch.arange(T) - 70, torch.arange(T)).expand(B, T)
    mask = attention_mask(pos, pos, window, seg)
    inputs = [x for x in (q, k, v, s) if x is not None]
    grad = torch.randn(B, T, K * G * Dh, generator=g)
    ref = materialized_sdpa_with_sinks(q, k, v, s, mask)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    out = trainable_sdpa_with_sinks(q, k, v, s, mask)
    grads = torch.autograd.grad(out, inputs, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)
