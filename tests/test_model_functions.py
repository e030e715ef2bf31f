"""Pure functions of the model against their formulas (float64) and transformers, one test per known pitfall."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss.config import ModelConfig, preset
from gptoss.model import (MoE, RMSNorm, apply_rope, attention_mask, rope_cos_sin, sdpa_with_sinks, swiglu,
                          yarn_inv_freq)
from hf_reference import hf_config


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_matches_transformers_on_real_config(truncate):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = preset("gpt-oss-20b").replace(rope_truncate=truncate)
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_config(config), "cpu")
    ours, concentration = yarn_inv_freq(config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert concentration == pytest.approx(0.1 * math.log(32) + 1) == their_scale


def test_yarn_correction_range_is_not_rounded():
    """low ≈ 8.09, high ≈ 17.40: dims below keep 1/θ^(2i/d), dims above are divided by 32, a ramp between."""
    config = preset("gpt-oss-20b")
    inv_freq, _ = yarn_inv_freq(config)
    base = 1.0 / 150000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ratio = inv_freq.double() / base
    torch.testing.assert_close(ratio[:9], torch.ones(9, dtype=torch.float64))
    torch.testing.assert_close(ratio[18:], torch.full((14,), 1 / 32, dtype=torch.float64))
    low = 64 * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(150000))
    high = 64 * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(150000))
    assert low == pytest.approx(8.09, abs=0.01) and high == pytest.approx(17.40, abs=0.01)
    ramp = (12 - low) / (high - low)  # dim 12 sits inside the ramp, unrounded
    assert ratio[12].item() == pytest.approx((1 - ramp) + ramp / 32, rel=1e-5)
    rounded, _ = yarn_inv_freq(config.replace(rope_truncate=True))
    assert (rounded - inv_freq).abs().max() > 1e-4


def test_rope_is_half_split_as_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

    config = preset("gpt-oss-20b")
    q = torch.randn(1, 50, 4, 64, dtype=torch.float64)
    positions = torch.arange(50)[None] * 37
    inv_freq, conc = yarn_inv_freq(config)
    cos, sin = rope_cos_sin(positions, inv_freq.double(), conc)
    assert cos.dtype == torch.float64
    theirs, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos[:, :, 0], sin[:, :, 0])
    torch.testing.assert_close(apply_rope(q, cos, sin), theirs.transpose(1, 2))
    # Rotation by the same angle preserves dot products up to concentration²: relative position only.
    k = torch.randn(1, 50, 4, 64, dtype=torch.float64)
    shifted = rope_cos_sin(positions + 1000, inv_freq.double(), conc)
    a = (apply_rope(q, cos, sin) * apply_rope(k, cos, sin)).sum(-1)
    b = (apply_rope(q, *shifted) * apply_rope(k, *shifted)).sum(-1)
    torch.testing.assert_close(a, b)


def test_sliding_window_counts_the_current_token():
    pos = torch.arange(300)[None]
    mask = attention_mask(pos, pos, sliding_window=128)[0]
    assert mask.sum(-1).tolist() == [min(i + 1, 128) for i in range(300)]
    assert mask[200, 200] and mask[200, 73] and not mask[200, 72] and not mask[200, 201]
    full = attention_mask(pos, pos, None)[0]
    assert torch.equal(full, torch.ones(300, 300, dtype=torch.bool).tril())


def reference_attention(q, k, v, sinks, mask):
    """One head at a time, straight from the definition: softmax over [scores, sink], drop the sink column."""
    B, T, K, G, Dh = q.shape
    out = torch.zeros(B, T, K, G, Dh, dtype=q.dtype)
    for b, kh, g in ((b, kh, g) for b in range(B) for kh in range(K) for g in range(G)):
        s = q[b, :, kh, g] @ k[b, :, kh].T / math.sqrt(Dh)
        s = s.masked_fill(~mask[b], float("-inf"))
        s = torch.cat([s, sinks[kh * G + g].expand(T, 1)], dim=1)
        out[b, :, kh, g] = torch.softmax(s, dim=1)[:, :-1] @ v[b, :, kh]
    return out.reshape(B, T, -1)


def test_attention_with_sinks_float64():
    g = torch.Generator().manual_seed(0)
    B, T, K, G, Dh = 2, 12, 2, 3, 8
    q = torch.randn(B, T, K, G, Dh, dtype=torch.float64, generator=g)
    k = torch.randn(B, T, K, Dh, dtype=torch.float64, generator=g)
    v = torch.randn(B, T, K, Dh, dtype=torch.float64, generator=g)
    sinks = torch.randn(K * G, dtype=torch.float64, generator=g, requires_grad=True)
    pos = torch.arange(T).expand(B, T)
    mask = attention_mask(pos, pos, sliding_window=4)
    ours = sdpa_with_sinks(q, k, v, sinks, mask).double()
    torch.testing.assert_close(ours, reference_attention(q, k, v, sinks, mask))
    # The equivalent form out_without_sink · sigmoid(lse − sink).
    no_sink = sdpa_with_sinks(q, k, v, torch.full_like(sinks, -torch.inf), mask).double()
    scores = torch.einsum("btkgd,bskd->btkgs", q, k) / math.sqrt(Dh)
    lse = scores.masked_fill(~mask[:, :, None, None], -torch.inf).logsumexp(-1)  # (B, T, K, G)
    gate = torch.sigmoid(lse - sinks.view(K, G))
    torch.testing.assert_close(ours, (no_sink.view(B, T, K, G, Dh) * gate[..., None]).reshape(B, T, -1))
    torch.autograd.gradcheck(lambda s: sdpa_with_sinks(q, k, v, s, mask), (sinks,))


def test_attention_query_tiles_are_exact(monkeypatch):
    """Long prompts run the queries in tiles (SCORES_BUDGET_BYTES): the same as one pass, gradients too (rows
    are independent; only a GEMM's blocking for another row count could move a last bit)."""
    import gptoss.model as model

    g = torch.Generator().manual_seed(1)
    B, T, K, G, Dh = 2, 37, 2, 4, 16
    q = torch.randn(B, T, K, G, Dh, generator=g, requires_grad=True)
    k, v = torch.randn(B, T, K, Dh, generator=g), torch.randn(B, T, K, Dh, generator=g)
    sinks = torch.randn(K * G, generator=g)
    pos = torch.arange(T).expand(B, T)
    mask = attention_mask(pos, pos, sliding_window=8)
    whole = sdpa_with_sinks(q, k, v, sinks, mask)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), q)
    monkeypatch.setattr(model, "SCORES_BUDGET_BYTES", 4 * B * K * G * T * 5)  # tiles of 5 queries, then 2
    tiled = sdpa_with_sinks(q, k, v, sinks, mask)
    (grad_tiled,) = torch.autograd.grad(tiled.square().sum(), q)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_tiled, grad_whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["ring", "causal_offset", "padded", "no_sinks", "mha"])
def test_flash_attention_matches_the_definition(case):
    """CPU inference runs torch's fused flash kernel per query tile, over only the keys the tile can see, with
    the sink applied as sigmoid(logsumexp − sink): the same numbers as the definition, one head at a time,
    for a sliding layer's ring cache (keys out of order, empty slots), a later causal chunk, left-padded
    rows (pad queries see nothing: zeros), no sinks, and one query head per key head."""
    from gptoss.model import flash_sdpa_with_sinks

    g = torch.Generator().manual_seed(2)
    B, K, G, Dh = 2, 2, (1 if case == "mha" else 4), 16
    T, past, window = 150, 0, None
    if case == "ring":  # 20 cached keys in ring order (oldest overwritten), 4 empty slots, then T new ones
        T, window = 70, 24
        cached = torch.tensor([40 + (i % 20) if i < 20 else -1 for i in range(24)])
        k_pos = torch.cat([cached.roll(7), torch.arange(60, 60 + T)]).expand(B, -1)
        q_pos = torch.arange(60, 60 + T).expand(B, T)
    else:
        past = 90 if case == "causal_offset" else 0
        window = 32 if case == "no_sinks" else None
        k_pos = torch.arange(past + T).expand(B, -1).clone()
        q_pos = k_pos[:, past:].clone()
        if case == "padded":  # row 1 is left-padded by 11 tokens
            k_pos[1, :11], q_pos[1, :11] = -1, -1
            k_pos[1, 11:] -= 11
            q_pos[1, 11:] -= 11
    S = k_pos.shape[1]
    q = torch.randn(B, T, K, G, Dh, generator=g)
    k, v = torch.randn(B, S, K, Dh, generator=g), torch.randn(B, S, K, Dh, generator=g)
    sinks = None if case == "no_sinks" else torch.randn(K * G, generator=g)
    mask = attention_mask(q_pos, k_pos, window)
    expected = reference_attention(q.double(), k.double(), v.double(),
                                   torch.full((K * G,), -torch.inf, dtype=torch.float64) if sinks is None
                                   else sinks.double(), mask)
    with torch.no_grad():
        ours = flash_sdpa_with_sinks(q, k, v, sinks, mask)
        dispatched = sdpa_with_sinks(q, k, v, sinks, mask)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dispatched, ours)
    if case == "padded":
        assert ours[1, :11].abs().max() == 0


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])  # CPU caches hold fp32
@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("case", ["ring", "causal_offset", "padded"])
def test_flash_attention_in_bf16_is_as_close_as_bf16_allows(case, native_bf16, cache_dtype, monkeypatch):
    """bf16 activations: on CPUs that multiply bf16 natively the flash kernel runs in bf16 (fp32 softmax and
    accumulators, probabilities rounded to bf16; keys and values from an fp32 cache rounded to bf16),
    elsewhere in fp32. Given the keys and values it ran on, the output is within a small multiple of rounding
    the exact result to bf16, the output's own dtype (measured: mean 1.13×, max ≤ 1.8×). Rounding fp32 keys
    costs more (mean 2.8×, max 3.6× on these scores of std 4), about what a bf16 cache costs everywhere."""
    import gptoss.model as model

    monkeypatch.setattr(model, "_CPU_BF16_NATIVE", native_bf16)
    g = torch.Generator().manual_seed(3)
    B, K, G, Dh, T = 2, 2, 4, 64, 300
    past = 40 if case == "causal_offset" else 0
    k_pos = torch.arange(past + T).expand(B, -1).clone()
    if case == "ring":  # a sliding layer's ring: keys out of order
        k_pos = torch.cat([k_pos[:, :past + 64].roll(9, 1), k_pos[:, past + 64:]], 1)
    q_pos = torch.arange(past, past + T).expand(B, -1).clone()
    if case == "padded":
        k_pos[1, :11], q_pos[1, :11] = -1, -1
    S = k_pos.shape[1]
    q = (2 * torch.randn(B, T, K, G, Dh, generator=g)).bfloat16()
    k = (2 * torch.randn(B, S, K, Dh, generator=g)).to(cache_dtype)
    v = torch.randn(B, S, K, Dh, generator=g).to(cache_dtype)
    sinks = torch.randn(K * G, generator=g)
    mask = attention_mask(q_pos, k_pos, 128 if case == "ring" else None)
    kernel_kv = torch.bfloat16 if native_bf16 else torch.float32
    exact = reference_attention(q.double(), k.double(), v.double(), sinks.double(), mask)
    given = reference_attention(q.double(), k.to(kernel_kv).double(), v.to(kernel_kv).double(), sinks.double(),
                                mask)
    with torch.no_grad():
        ours = model.flash_sdpa_with_sinks(q, k, v, sinks, mask)
    assert ours.dtype == torch.bfloat16
    rounding = (exact.bfloat16().double() - exact).abs()
    error = (ours.double() - given).abs()
    assert error.mean() <= 1.3 * rounding.mean(), (error.mean(), rounding.mean())
    assert error.max() <= 2.5 * rounding.max(), (error.max(), rounding.max())
    error = (ours.double() - exact).abs()
    assert error.mean() <= 3.5 * rounding.mean(), (error.mean(), rounding.mean())


@pytest.mark.parametrize("rows", [1, 31, 32, 45, 200])
def test_bucketed_linear_keeps_the_rows(rows):
    """CPU bf16 GEMMs pad their rows to a multiple of ROW_BUCKET (oneDNN then reuses its primitives): the
    real rows equal an unpadded GEMM's, in [N, D] and [B, T, D] shapes, and the padding never leaks out."""
    from gptoss.model import linear_rows_bucketed

    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 40, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    x = torch.randn(rows, 40, generator=g).bfloat16()
    expected = x.float() @ w.float().T + b.float()
    for shaped in (x, x.view(1, rows, 40)):
        y = linear_rows_bucketed(shaped, w, b)
        assert y.shape == (*shaped.shape[:-1], 48) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.reshape(rows, 48).float(), expected, rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(linear_rows_bucketed(x.float(), w.float(), b.float()), expected)


def test_swiglu_interleaved_and_clamped():
    gate = torch.tensor([-10.0, -1.0, 0.5, 3.0, 7.0, 20.0], dtype=torch.float64)
    linear = torch.tensor([-20.0, -7.5, 0.0, 2.0, 6.9, 9.0], dtype=torch.float64)
    h = torch.stack([gate, linear], dim=-1).flatten()  # even = gate, odd = linear
    g, lin = gate.clamp(max=7), linear.clamp(-7, 7)
    expected = g * torch.sigmoid(1.702 * g) * (lin + 1)
    torch.testing.assert_close(swiglu(h, 1.702, 7.0), expected)


def test_router_softmax_is_over_the_top_k_only():
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, num_experts=8, experts_per_token=3,
                         intermediate_size=32)
    moe = MoE(config, dtype=torch.float64)
    torch.nn.init.normal_(moe.gate.weight)
    torch.nn.init.normal_(moe.gate.bias)  # the router has a bias
    t = torch.randn(5, 32, dtype=torch.float64)
    experts, weights = moe.route(t)
    logits = t @ moe.gate.weight.T + moe.gate.bias
    top = logits.topk(3, dim=-1)
    assert torch.equal(experts, top.indices)
    torch.testing.assert_close(weights.double(), torch.softmax(top.values, -1), rtol=1e-6, atol=1e-7)
    full = torch.softmax(logits, -1).gather(-1, experts)
    assert not torch.allclose(weights.double(), full)


def test_rmsnorm_is_fp32_inside_bf16():
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(3, 64) * 1000
    expected = (x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()).bfloat16()
    torch.testing.assert_close(norm(x.bfloat16()), expected, rtol=0, atol=0.016)


def test_fused_expert_kernel_bound_is_chosen_per_cpu_and_dtype(monkeypatch):
    """Past FUSED_ROWS_PER_EXPERT rows per expert the MoE dequantizes and runs GEMMs; where the fused kernel
    multiplies bf16 rows on AMX tiles it stays ahead longer (benchmarks/RESULTS.md); fp32 never reaches AMX."""
    import gptoss.model as model_module

    E = 32
    monkeypatch.setattr(model_module.kernels, "amx_tiles", lambda: False)
    assert model_module.fused_experts_fit(64 * E, E, torch.bfloat16)
    assert not model_module.fused_experts_fit(64 * E + 1, E, torch.bfloat16)
    monkeypatch.setattr(model_module.kernels, "amx_tiles", lambda: True)
    assert model_module.fused_experts_fit(128 * E, E, torch.bfloat16)  # the tiles' bound, not the vector kernels'
    assert not model_module.fused_experts_fit(128 * E + 1, E, torch.bfloat16)
    assert model_module.fused_experts_fit(64 * E, E, torch.float32)
    assert not model_module.fused_experts_fit(64 * E + 1, E, torch.float32)
    monkeypatch.setattr(model_module, "FUSED_ROWS_PER_EXPERT", 0)  # forcing the grouped path still works on AMX
    assert not model_module.fused_experts_fit(4, E, torch.bfloat16)
