"""MoE training: capacity factor, router losses and balancing, gradients against transformers."""

from __future__ import annotations

import math

import torch

import gptoss
from gptoss.checkpoint import GLOBAL_NAMES, LAYER_NAMES
from gptoss.config import ModelConfig, preset
from gptoss.model import MoE, capacity_drop, swiglu
from gptoss.train import TrainConfig, train
from gptoss.train.moe import collapse_router
from gptoss.train.loop import lm_loss_sum
from gptoss.train.moe import record_routing, router_losses
from hf_reference import make_reference
from test_train import permutation_task


def test_capacity_drop_on_hand_built_routing():
    # capacity ⌈4·2/4 · 1.0⌉ = 2: expert 0 is every token's first choice, so tokens 2 and 3 lose it
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])
    assert capacity_drop(experts, 4, 1.0).tolist() == [[0, 1], [0, 2], [-1, 1], [-1, 3]]
    # capacity ⌈4·2/4 · 0.5⌉ = 1: first choices are queued before second choices (expert 0 goes to token 1's
    # first choice, not token 0's second), and expert 2 to token 3's first choice, not token 1's second
    experts = torch.tensor([[1, 0], [0, 2], [0, 3], [2, 0]])
    assert capacity_drop(experts, 4, 0.5).tolist() == [[1, -1], [0, -1], [-1, 3], [2, -1]]
    # a factor that rounds up: ⌈4·2/4 · 1.25⌉ = 3
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    assert capacity_drop(experts, 4, 1.25).tolist() == [[0, 1], [0, 1], [0, 1], [-1, -1]]


def hand_routed_moe():
    """A MoE whose router reads the first 4 hidden dims: token x = 2·u_a + u_b is routed to [a, b]."""
    config = preset("tiny").replace(num_experts=4, experts_per_token=2)
    moe = MoE(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        moe.norm.scale.fill_(1.0)
        moe.gate.weight.zero_()
        moe.gate.weight[:, :4] = torch.eye(4)
        moe.gate.bias.zero_()
    from gptoss.model import DenseExpertWeight

    moe.mlp1_weight = DenseExpertWeight(torch.randn(4, 2 * config.intermediate_size, config.hidden_size, generator=g) * 0.1)
    moe.mlp2_weight = DenseExpertWeight(torch.randn(4, config.hidden_size, config.intermediate_size, generator=g) * 0.1)
    routes = [[0, 1], [0, 2], [0, 1], [0, 3]]
    x = torch.zeros(1, 4, config.hidden_size)
    for i, (a, b) in enumerate(routes):
        x[0, i, a], x[0, i, b] = 2.0, 1.0
        x[0, i, 4:] = 0.01 * torch.randn(config.hidden_size - 4, generator=g)
    return moe, x, routes


def expert_out(moe: MoE, t: torch.Tensor, e: int) -> torch.Tensor:
    c = moe.config
    h = torch.nn.functional.linear(t, moe.mlp1_weight.weight[e], moe.mlp1_bias[e])
    return torch.nn.functional.linear(swiglu(h, c.swiglu_alpha, c.swiglu_limit), moe.mlp2_weight.weight[e],
                                      moe.mlp2_bias[e])


def test_capacity_in_the_moe_layer_drops_the_expected_slots_and_keeps_the_residual():
    moe, x, routes = hand_routed_moe()
    moe.record_routing = True
    with torch.no_grad():
        free = moe(x)
        assert moe.routing.experts.tolist() == routes
        moe.capacity_factor = 1.0
        capped = moe(x)
    assert moe.routing.selected.tolist() == routes
    assert moe.routing.experts.tolist() == [[0, 1], [0, 2], [-1, 1], [-1, 3]]
    # nothing dropped for tokens 0 and 1 (equal up to fp32 rounding: an expert's GEMM has fewer rows)
    torch.testing.assert_close(capped[0, :2], free[0, :2], rtol=1e-6, atol=1e-6)
    t = moe.norm(x)[0]
    with torch.no_grad():
        logits = moe.gate(t)
        for i in (2, 3):  # only the second choice remains, weighted by its share of the top-2 softmax
            w = torch.softmax(logits[i, routes[i]], -1)[1]
            torch.testing.assert_close(capped[0, i], x[0, i] + w * expert_out(moe, t[i], routes[i][1]))
    # a factor large enough that nothing drops gives exactly the no-capacity output
    moe.capacity_factor = float(moe.config.num_experts)
    with torch.no_grad():
        assert torch.equal(moe(x), free)
        assert (moe.routing.experts >= 0).all()


def test_large_capacity_equals_no_capacity_on_a_random_model():
    config = preset("tiny")
    model = gptoss.Transformer(config, dtype=torch.float32)
    from gptoss import synthetic

    model.load_state_dict(dict(synthetic.random_tensors(config, seed=3, dtype=torch.float32)))
    model.dense_experts()
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        for m in model.modules():
            if isinstance(m, MoE):
                m.capacity_factor = config.num_experts / config.experts_per_token
        assert torch.equal(model(tokens), ref)
        for m in model.modules():
            if isinstance(m, MoE):
                m.capacity_factor = 0.5
        assert not torch.equal(model(tokens), ref)


# ---------------------------------------------------------------- balancing
def balance_run(tmp_path, **moe) -> list[float]:
    """Per layer, the entropy of the expert load summed over the last 5 of 20 steps."""
    cfg = TrainConfig.from_dict({
        "model": {"preset": "tiny", "vocab_size": 64, "num_hidden_layers": 2, "experts_per_token": 2},
        "data": {"seq_len": 32, "batch_size": 4},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "moe": {"aux_loss_coef": 0.0, **moe},
        "train": {"steps": 20, "out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32"}})
    result = train(cfg, documents=permutation_task(n_docs=60), progress=False, prepare=collapse_router)
    assert result.metrics[0]["load_entropy"][0] < 0.75  # collapsed at the start: ≈ log 2
    load = torch.tensor([m["expert_load"] for m in result.metrics[-5:]]).mean(0)  # (layers, E)
    return (-(load * load.clamp(min=1e-30).log()).sum(-1)).tolist()


def test_balancing_from_a_collapsed_router(tmp_path):
    """E = 8, k = 2, the router initialised to send every token to experts 0 and 1 (load entropy log 2 ≈ 0.69).
    Over steps 16–20: without balancing the load entropy stays below 0.8; with the Switch aux loss (coef 0.1)
    or DeepSeek-V3 bias balancing (γ = 0.1) it exceeds 0.9 · log 8 ≈ 1.87 in every layer."""
    none = balance_run(tmp_path / "none")
    aux = balance_run(tmp_path / "aux", aux_loss_coef=0.1)
    bias = balance_run(tmp_path / "bias", bias_update_rate=0.1)
    print(f"\nload entropy (log 8 = {math.log(8):.3f}): none {none}, aux {aux}, bias {bias}")
    assert max(none) < 0.8
    assert min(aux) > 0.9 * math.log(8)
    assert min(bias) > 0.9 * math.log(8)


# ---------------------------------------------------------------- gradients vs transformers
GRAD_CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_experts=8, experts_per_token=2,
                          intermediate_size=64, sliding_window=8, initial_context_length=64,
                          max_position_embeddings=2048)


def our_grad(model, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name].grad


def test_gradients_match_transformers(tmp_path):
    """fp32, LM loss + 0.5 · router load-balancing loss (transformers' load_balancing_loss_func, our
    aux_loss = "pooled"): the loss
    terms agree and every parameter's gradient is within 1e-4 relative (to its largest entry) of
    transformers' GptOssForCausalLM."""
    config = GRAD_CONFIG
    hf = make_reference(config, tmp_path / "ref", seed=5)
    hf.train()
    hf.config.router_aux_loss_coef = 0.5
    hf.router_aux_loss_coef = 0.5
    tokens = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    out = hf(tokens, labels=tokens, output_router_logits=True)
    out.loss.backward()

    model = gptoss.load(tmp_path / "ref", dtype=torch.float32).dense_experts().train().requires_grad_(True)
    record_routing(model)
    from gptoss.train.data import Batch

    T = tokens.shape[1]
    batch = Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(2, T - 1, dtype=torch.bool),
                  torch.arange(T - 1).expand(2, T - 1), torch.zeros(2, T - 1, dtype=torch.int64))
    # transformers routes every position, the last included: run it too (it has no target)
    batch.tokens = tokens
    batch.positions = torch.arange(T).expand(2, T)
    batch.segments = torch.zeros(2, T, dtype=torch.int64)
    batch.targets = torch.cat((tokens[:, 1:], tokens[:, :1]), 1)
    batch.mask = torch.ones(2, T, dtype=torch.bool)
    batch.mask[:, -1] = False
    loss_sum, n = lm_loss_sum(model, batch)
    aux, _ = router_losses(model, aux_loss="pooled")  # transformers pools the layers
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-5, atol=0)
    loss = loss_sum / n + 0.5 * aux
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    loss.backward()

    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    checked = 0

    def check(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
        nonlocal checked
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-4 * theirs.abs().max().item(), (name, err, theirs.abs().max().item())
        checked += 1

    for ours, theirs in GLOBAL_NAMES.items():
        check(our_grad(model, ours), hf_grads[theirs], ours)
    for i in range(config.num_hidden_layers):
        for ours, theirs in LAYER_NAMES.items():
            ours, theirs = ours.format(i=i), theirs.format(i=i)
            if "_weight." in ours:
                continue
            check(our_grad(model, ours), hf_grads[theirs], ours)
        a = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            theirs = torch.cat([hf_grads[a + f"{p}_proj.{kind}"] for p in "qkv"])
            check(our_grad(model, f"block.{i}.attn.qkv.{kind}"), theirs, f"qkv.{kind}")
        e = f"model.layers.{i}.mlp.experts."
        check(our_grad(model, f"block.{i}.mlp.mlp1_weight.weight"), hf_grads[e + "gate_up_proj"].transpose(1, 2), "mlp1")
        check(our_grad(model, f"block.{i}.mlp.mlp2_weight.weight"), hf_grads[e + "down_proj"].transpose(1, 2), "mlp2")
    assert checked == len(list(model.parameters()))
    assert hf_grads["model.layers.0.mlp.router.weight"].abs().max() > 0


def test_dropped_fraction_and_router_losses_are_logged(tmp_path):
    """Collapsed router (every token's two choices are experts 0 and 1), capacity factor 1: each expert
    takes ⌈N·2/8⌉ = N/4 of its N assignments, so exactly 75% of all assignments drop at the first step."""
    cfg = TrainConfig.from_dict({
        "model": {"preset": "tiny", "vocab_size": 64, "num_hidden_layers": 2, "experts_per_token": 2},
        "data": {"seq_len": 32, "batch_size": 4},
        "moe": {"capacity_factor": 1.0, "z_loss_coef": 1e-3},
        "train": {"steps": 2, "out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32"}})
    result = train(cfg, documents=permutation_task(n_docs=20), progress=False, prepare=collapse_router)
    first = result.metrics[0]
    assert first["dropped_pct"] == [75.0, 75.0]
    assert first["expert_load"][0][:2] == [0.5, 0.5] and first["load_max_over_mean"] == [4.0, 4.0]
    assert first["z_loss"] > 0 and first["aux_loss"] > 0


def test_router_loss_formulas_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    chosen = [x.topk(2, -1).indices for x in logits]
    from gptoss.train.moe import load_balancing_loss, z_loss

    # Switch, per layer: E · Σ_e f_e P_e with f_e = share of the layer's tokens with e in their top-2, summed
    f = [torch.bincount(c.reshape(-1), minlength=4).double() / 10 for c in chosen]
    P = [x.softmax(-1).mean(0) for x in logits]
    per_layer = sum(4 * (fi * Pi).sum() for fi, Pi in zip(f, P))
    torch.testing.assert_close(load_balancing_loss(logits, chosen, 4).double(), per_layer)
    # pooled (transformers): the same product over the tokens of both layers together
    f = torch.stack([torch.bincount(c.reshape(-1), minlength=4) for c in chosen]).sum(0).double() / 20
    P = torch.cat([x.softmax(-1) for x in logits]).mean(0)
    torch.testing.assert_close(load_balancing_loss(logits, chosen, 4, mode="pooled").double(), 4 * (f * P).sum())
    expected = sum(torch.logsumexp(x, -1).pow(2).mean() for x in logits)  # ST-MoE: summed over layers
    torch.testing.assert_close(z_loss(logits).double(), expected)
