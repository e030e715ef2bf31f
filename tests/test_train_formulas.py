"""The training formulas against their papers, on cases computed by hand (issue 22).

Switch Transformer §2.2 eq. 4–6 (load balancing, per layer), ST-MoE §3.1 eq. 5 (z-loss, per layer), OLMo 2
§3.2 (spike score), OLMo 2 §2.1 / transformers' Olmo2Attention (QK-norm over the whole projections), Switch §2.2
expert capacity with GShard's slot order and V-MoE's batch-prioritized order."""

from __future__ import annotations

import math

import pytest
import torch

import gptoss
from gptoss import synthetic
from gptoss.config import preset
from gptoss.errors import ConfigError
from gptoss.model import MoE, capacity_drop
from gptoss.train.moe import load_balancing_loss, switch_loss_per_layer, z_loss
from gptoss.train.stability import OLMO2_SIGMAS, OLMO2_WINDOW, spike_flags, spike_score

NEG = float("-inf")


def collapsed_layers(n: int = 6):
    """E = 4, k = 2. Layer 0: every token's router puts all its probability on experts {0, 1} (logits 0, 0, −∞,
    −∞: softmax ½, ½, 0, 0); layer 1 the same on {2, 3}."""
    l0 = torch.tensor([[0.0, 0.0, NEG, NEG]]).expand(n, 4)
    l1 = torch.tensor([[NEG, NEG, 0.0, 0.0]]).expand(n, 4)
    return [l0, l1], [torch.tensor([[0, 1]]).expand(n, 2), torch.tensor([[2, 3]]).expand(n, 2)]


def test_switch_loss_of_layers_collapsed_onto_different_experts():
    """By hand, with Switch's eq. 4 (α left out) loss = E · Σ_e f_e · P_e, f_e = (assignments to e) / T:
    - per layer, layer 0: f = (1, 1, 0, 0) (each of the T tokens sends one assignment to 0 and one to 1),
      P = (½, ½, 0, 0) → 4 · (1·½ + 1·½) = 4.000; layer 1 likewise 4.000; Switch adds each layer's loss: 8.000.
      A balanced layer (f = ½ each, P = ¼ each) gives 4 · 4 · ⅛ = 2 = k, so each layer is at twice the minimum.
    - pooled (transformers): 2T rows, counts T per expert → f = ½ each; P = mean of (½,½,0,0) and (0,0,½,½) =
      ¼ each → 4 · 4 · (½ · ¼) = 2.000: the balanced minimum — the pooled loss sees no imbalance at all."""
    logits, chosen = collapsed_layers()
    per_layer = switch_loss_per_layer(logits, chosen, 4)
    assert per_layer.tolist() == pytest.approx([4.0, 4.0], abs=1e-6)
    assert load_balancing_loss(logits, chosen, 4).item() == pytest.approx(8.0, abs=1e-6)
    assert load_balancing_loss(logits, chosen, 4, mode="pooled").item() == pytest.approx(2.0, abs=1e-6)
    # the balanced reference point: tokens alternate between {0, 1} and {2, 3} with uniform probabilities
    uniform = torch.zeros(6, 4)
    alternate = torch.tensor([[0, 1], [2, 3]] * 3)
    assert switch_loss_per_layer([uniform], [alternate], 4).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="aux_loss mode"):
        load_balancing_loss(logits, chosen, 4, mode="mean")


def test_only_the_per_layer_loss_pushes_collapsed_layers_apart():
    """The gradient that reaches the routers, finite logits: layer 0 → (2, 2, 0, 0), layer 1 → (0, 0, 2, 2),
    choices {0, 1} and {2, 3}. Pooled, f_e = ½ for every e, so the loss is E · ½ · Σ_e P_e = E/2 whatever the
    logits: no gradient at all. Per layer, layer 0's loss is 4 · (P_0 + P_1), which descent lowers by
    lowering the logits of experts 0 and 1 and raising those of 2 and 3."""
    n = 6
    l0 = torch.tensor([[2.0, 2.0, 0.0, 0.0]]).repeat(n, 1).requires_grad_(True)
    l1 = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(n, 1).requires_grad_(True)
    chosen = [torch.tensor([[0, 1]]).expand(n, 2), torch.tensor([[2, 3]]).expand(n, 2)]
    load_balancing_loss([l0, l1], chosen, 4, mode="pooled").backward()
    assert l0.grad.abs().max().item() < 1e-7  # f = ½ everywhere: E·Σ_e ½·P_e = E/2 · mean Σ_e p_e = const
    l0.grad = None
    load_balancing_loss([l0, l1], chosen, 4).backward()
    assert (l0.grad[:, :2] > 0).all() and (l0.grad[:, 2:] < 0).all()  # descent lowers experts 0/1, raises 2/3


def test_z_loss_is_summed_over_layers():
    """ST-MoE eq. 5 per router: (1/B) Σ_i logsumexp(x_i)². Layer 0: logits 0,0,0,0 → lse = log 4; layer 1:
    logits log 3, 0, 0, 0 → lse = log(3 + 3) = log 6. Summed: (log 4)² + (log 6)²."""
    l0 = torch.zeros(5, 4, dtype=torch.float64)
    l1 = torch.tensor([[math.log(3), 0.0, 0.0, 0.0]], dtype=torch.float64).expand(5, 4)
    assert z_loss([l0, l1]).item() == pytest.approx(math.log(4) ** 2 + math.log(6) ** 2, rel=1e-6)


def test_spike_score_as_olmo2_defines_it():
    """Window 4 before each value (1, 2, 1, 2): mean 1.5, sample sd √(4·¼/3) = 0.57735, 7 sd = 4.0415.
    5.6 is 4.1 above (a spike), −2.6 is 4.1 below (a spike: either side counts), 5.5 is 4.0 above (not).
    The score is the share of the whole series, in percent."""
    assert (OLMO2_WINDOW, OLMO2_SIGMAS) == (1000, 7.0)
    base = [1.0, 2.0, 1.0, 2.0]
    assert spike_flags(base + [5.6], window=4) == [False] * 4 + [True]
    assert spike_flags(base + [-2.6], window=4) == [False] * 4 + [True]
    assert spike_flags(base + [5.5], window=4) == [False] * 5
    assert spike_score(base + [5.6], window=4) == pytest.approx(20.0)
    # 10 values, one spike: 10 % — and the spike is outside the window of the values that follow it
    series = base + [5.6] + [1.0, 2.0, 1.0, 2.0, 1.5]
    assert spike_flags(series, window=4) == [False] * 4 + [True] + [False] * 5
    assert spike_score(series, window=4) == pytest.approx(10.0)
    # fewer predecessors than the window: no rolling average yet, never a spike (unless min_history allows)
    assert spike_flags([1.0, 1.1, 100.0], window=4) == [False] * 3
    assert spike_flags([1.0, 1.1, 100.0], window=4, min_history=2) == [False, False, True]
    assert spike_score([1.0, float("nan")], window=4) == pytest.approx(50.0)  # a NaN loss is a spike


def qk_model(qk_norm) -> gptoss.Transformer:
    config = preset("tiny").replace(vocab_size=64, num_hidden_layers=2, layer_types=(), qk_norm=qk_norm,
                                    rms_norm_eps=1e-12)  # eps: the only scale a norm sees
    model = gptoss.Transformer(config, dtype=torch.float64)
    state = dict(synthetic.random_tensors(config.replace(qk_norm=False), seed=0, dtype=torch.float64))
    model.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm scales, so that the scale's shape matters too
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.scale", "k_norm.scale")):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64))
    return model.dense_experts(torch.float64).eval()


def test_olmo2_qk_norm_normalises_the_whole_projection():
    """OLMo-2: q_norm over num_heads·head_dim, k_norm over num_kv_heads·head_dim (transformers' Olmo2Attention:
    `q_norm(q_proj(x))` before the view into heads); Qwen3's per-head form normalises over head_dim. Scaling
    one query head's rows by 3 is invisible to the per-head norm but shifts the OLMo-2 norm's RMS (the other
    heads shrink relative to it); scaling every q and k row by 3 is invisible to both."""
    c = preset("tiny")
    H, K, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    olmo2, per_head = qk_model("olmo2"), qk_model("per_head")
    assert olmo2.block[0].attn.q_norm.scale.shape == (H * Dh,) and olmo2.block[0].attn.k_norm.scale.shape == (K * Dh,)
    assert per_head.block[0].attn.q_norm.scale.shape == (Dh,)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))

    def change(model, rows: slice) -> float:
        with torch.no_grad():
            before = model(tokens)
            for block in model.block:
                block.attn.qkv.weight[rows] *= 3
                block.attn.qkv.bias[rows] *= 3
            return (model(tokens) - before).abs().max().item()

    one_head = slice(0, Dh)
    assert change(qk_model("per_head"), one_head) < 1e-10
    assert change(qk_model("olmo2"), one_head) > 1e-3
    all_qk = slice(0, (H + K) * Dh)
    assert change(qk_model("per_head"), all_qk) < 1e-10 and change(qk_model("olmo2"), all_qk) < 1e-10
    # the normalised queries are q / rms(q over all H·Dh values) · scale (float64, by hand)
    attn = olmo2.block[0].attn
    x = torch.randn(1, 3, c.hidden_size, dtype=torch.float64)
    q = attn.qkv(attn.norm(x))[..., :H * Dh]
    expected = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-12) * attn.q_norm.scale
    torch.testing.assert_close(attn.q_norm(q), expected)


def test_qk_norm_true_is_refused_as_ambiguous():
    with pytest.raises(ConfigError, match="qk_norm.*ambiguous.*'olmo2'.*'per_head'"):
        preset("tiny").replace(qk_norm=True)
    with pytest.raises(ConfigError, match="qk_norm"):
        preset("tiny").replace(qk_norm="qwen")


def test_capacity_priority_by_score():
    """E = 2, k = 1, capacity ⌈4·1/2 · 1⌉ = 2; tokens 0–2 want expert 0. By position tokens 0 and 1 keep it;
    by score (0.1, 0.9, 0.5, 0.3) tokens 1 and 2 do."""
    experts = torch.tensor([[0], [0], [0], [1]])
    assert capacity_drop(experts, 2, 1.0).tolist() == [[0], [0], [-1], [1]]
    score = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert capacity_drop(experts, 2, 1.0, score).tolist() == [[-1], [0], [0], [1]]
    # k = 2, E = 4, capacity ⌈4·2/4 · 0.5⌉ = 1: every first choice is queued before any second choice, and
    # within a slot the higher score goes first: expert 0 → token 3 (first choice, score .9), not token 0
    experts = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3]])
    score = torch.tensor([0.2, 0.4, 0.3, 0.9])
    assert capacity_drop(experts, 4, 0.5, score).tolist() == [[-1, -1], [1, -1], [2, -1], [0, 3]]
    assert capacity_drop(experts, 4, 0.5).tolist() == [[0, -1], [1, -1], [2, -1], [-1, 3]]


@pytest.mark.parametrize("priority", ["position", "score"])
def test_capacity_over_ranks_equals_one_process(priority):
    """A MoE layer on 2 'ranks' (halves of the rows) whose capacity_gather hands it the other rank's rows drops
    exactly the assignments the one-process layer drops on all rows (the real gloo run: test_train_distributed)."""
    config = preset("tiny").replace(num_experts=4, experts_per_token=2)
    moe = MoE(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    moe.capacity_factor, moe.capacity_priority, moe.record_routing = 1.0, priority, True
    x = torch.randn(4, 6, config.hidden_size, generator=g)
    with torch.no_grad():
        whole = moe(x)
        ref = moe.routing.experts
        assert (ref < 0).any()  # capacity bites
        logits_all, experts_all = moe.routing.logits, moe.routing.selected
        rows = 2 * 6
        parts, outs = [], []
        for rank in range(2):
            moe.capacity_gather = lambda t, r=rank: ((experts_all if t.dtype == torch.int64 else
                                                     torch.softmax(logits_all, -1).max(-1).values), r * rows)
            outs.append(moe(x[2 * rank:2 * rank + 2]))
            parts.append(moe.routing.experts)
    assert torch.equal(torch.cat(parts), ref)
    torch.testing.assert_close(torch.cat(outs), whole)
