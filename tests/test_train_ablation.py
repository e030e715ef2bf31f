"""GPT-2 → GPT-oss ablation flags on the one model: each flag changes what it should, and GPT-2 trains."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gptoss
from gptoss.config import FULL, SLIDING, preset
from gptoss.errors import ConfigError
from gptoss.model import MoE, RMSNorm, sdpa_with_sinks
from gptoss.train.loop import init_weights, save_model
from test_train import permutation_task

V = 64


def model_with(seed: int = 0, **flags) -> gptoss.Transformer:
    config = preset("tiny").replace(vocab_size=V, num_hidden_layers=2, layer_types=(), **flags)
    model = gptoss.Transformer(config, dtype=torch.float32)
    init_weights(model.dense_experts(), seed)
    with torch.no_grad():  # non-trivial biases, sinks and norm scales (init_weights leaves them 0 / 1)
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokens(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def test_layer_norm_centres_and_has_a_bias():
    x = torch.randn(3, 5, 64, dtype=torch.float64) + 4.0
    ln = RMSNorm(64, 1e-5, centered=True).double()
    with torch.no_grad():
        ln.scale.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (64,), ln.scale, ln.bias, 1e-5))
    rms = RMSNorm(64, 1e-5).double()
    assert not hasattr(rms, "bias") and rms(x).mean(-1).abs().min() > 0.5  # RMSNorm keeps the offset
    model = model_with(norm_type="layer")
    assert {"norm.bias", "block.0.attn.norm.bias", "block.1.mlp.norm.bias"} <= dict(model.named_parameters()).keys()


def test_learned_positions_replace_rope():
    """RoPE sees relative positions only: shifting all positions leaves the logits unchanged. Learned absolute
    positions make the model depend on the shift; with their table zeroed, nothing positional is left."""
    t = tokens()
    pos = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        rope = model_with(rope_scaling_factor=1.0)
        torch.testing.assert_close(rope(t, pos + 7), rope(t, pos), rtol=1e-4, atol=1e-4)
        learned = model_with(position_embedding="learned")
        assert learned.position.weight.shape == (2048, 64)
        assert (learned(t, pos + 7) - learned(t, pos)).abs().max() > 1e-3
        learned.position.weight.zero_()
        torch.testing.assert_close(learned(t, pos + 7), learned(t, pos), rtol=1e-5, atol=1e-5)


def test_no_sinks_is_plain_softmax_attention_equal_to_torch_sdpa():
    g = torch.Generator().manual_seed(0)
    B, T, K, G, Dh = 2, 9, 2, 3, 16
    q = torch.randn(B, T, K, G, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, T, K, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(T).expand(B, T)
    mask = pos[:, :, None] >= pos[:, None, :]
    ours = sdpa_with_sinks(q, k, v, None, mask)
    ref = F.scaled_dot_product_attention(q.reshape(B, T, K * G, Dh).transpose(1, 2),  # (B, H, T, Dh)
                                         k.repeat_interleave(G, dim=2).transpose(1, 2),
                                         v.repeat_interleave(G, dim=2).transpose(1, 2), is_causal=True)
    torch.testing.assert_close(ours, ref.transpose(1, 2).reshape(B, T, -1))
    with_sinks = sdpa_with_sinks(q, k, v, torch.zeros(K * G, dtype=torch.float64), mask)
    assert (with_sinks - ours).abs().max() > 1e-3  # a zero sink logit still takes probability mass
    model = model_with(attention_sinks=False)
    assert not any(name.endswith("sinks") for name, _ in model.named_parameters())


def test_mha_equals_gqa_with_each_kv_head_repeated():
    gqa = model_with(seed=3)  # tiny: 4 query heads, 2 kv heads
    c = gqa.config
    mha = gptoss.Transformer(c.replace(num_key_value_heads=4), dtype=torch.float32).dense_experts().eval()
    H, K, Dh, G = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.q_per_kv
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            q, k, v = w.split([H * Dh, K * Dh, K * Dh])
            rep = [x.view(K, Dh, *x.shape[1:]).repeat_interleave(G, 0).reshape(H * Dh, *x.shape[1:]) for x in (k, v)]
            state[name] = torch.cat([q, *rep])
    mha.load_state_dict(state)
    assert mha.block[0].attn.qkv.weight.shape[0] == 3 * H * Dh
    with torch.no_grad():
        torch.testing.assert_close(mha(tokens()), gqa(tokens()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_dense_ffn_replaces_the_moe(kind):
    model = model_with(mlp_type=kind)
    mlp = model.block[0].mlp
    assert not hasattr(mlp, "gate") and not hasattr(mlp, "mlp1_weight")
    assert mlp.mlp1.weight.shape == ((2 if kind == "swiglu" else 1) * 64, 64)
    x = torch.randn(2, 5, 64)
    h = mlp.mlp1(mlp.norm(x))
    h = F.gelu(h, approximate="tanh") if kind == "gelu" else \
        (lambda g, lin: g * torch.sigmoid(1.702 * g) * (lin + 1))(h[..., ::2].clamp(max=7), h[..., 1::2].clamp(-7, 7))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), x + mlp.mlp2(h))


def test_all_full_attention_sees_beyond_the_window():
    """One layer, window 8: token 0 reaches position 15 only when the layer is global."""
    for kind, reaches in ((SLIDING, False), (FULL, True)):
        config = preset("tiny").replace(vocab_size=V, num_hidden_layers=1, layer_types=(kind,))
        model = gptoss.Transformer(config, dtype=torch.float32)
        init_weights(model.dense_experts(), 0)
        t = tokens(16)
        changed = t.clone()
        changed[:, 0] = (t[:, 0] + 1) % V
        with torch.no_grad():
            diff = (model(changed)[:, 15] - model(t)[:, 15]).abs().max().item()
        assert (diff > 1e-6) == reaches, (kind, diff)


def test_dropout_only_in_training():
    model = model_with(dropout=0.3)
    t = tokens()
    with torch.no_grad():
        assert torch.equal(model(t), model(t))  # eval: deterministic, and equal to the dropout-free model
        plain = model_with()
        torch.testing.assert_close(model(t), plain(t))
        model.train()
        assert (model(t) - model(t)).abs().max() > 1e-3
        plain.train()
        assert torch.equal(plain(t), plain(t))  # dropout 0: train mode changes nothing


def test_flags_are_validated_and_gptoss_defaults_save_as_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="field 'mlp_type' = 'relu' must be one of 'moe', 'swiglu', 'gelu'"):
        preset("tiny").replace(mlp_type="relu")
    with pytest.raises(ConfigError, match="field 'dropout' = 1.5"):
        preset("tiny").replace(dropout=1.5)
    assert preset("tiny").checkpoint_compatible and preset("tiny").replace(dropout=0.1).checkpoint_compatible
    with pytest.raises(ConfigError, match="cannot be written as a GPT-oss checkpoint"):
        save_model(model_with(norm_type="layer"), tmp_path / "x")
    c = preset("tiny-gpt2")
    assert not c.checkpoint_compatible
    assert gptoss.ModelConfig.from_dict(c.to_original_dict()) == c  # the flags survive config.json


def test_gpt2_variant_trains_through_gptoss_train(tmp_path):
    docs = permutation_task(n_docs=100, alphabet=32)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"tokens": d.tokens}) + "\n" for d in docs))
    (tmp_path / "gpt2.toml").write_text(
        '[model]\npreset = "tiny-gpt2"\nvocab_size = 64\nnum_hidden_layers = 2\nmax_position_embeddings = 64\n'
        '[data]\nfiles = ["d.jsonl"]\nseq_len = 32\nbatch_size = 8\n'
        '[optim]\nlr = 3e-3\nmin_lr = 3e-4\nwarmup_steps = 3\n'
        '[train]\nsteps = 25\nout_dir = "out"\ndevice = "cpu"\n')
    done = subprocess.run([sys.executable, "-m", "gptoss", "train", str(tmp_path / "gpt2.toml"), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 0.9 * math.log(32) and rows[-1]["loss"] < 0.6 * rows[0]["loss"], \
        [r["loss"] for r in rows]
    step = tmp_path / "out" / "step-000025"
    assert not (step / "model").exists()  # train state only (no slot for LayerNorm biases, positions, ...)
    meta = json.loads((step / "train_state.json").read_text())["model_config"]
    assert meta["mlp_type"] == "gelu" and meta["layer_types"] == [FULL, FULL] and meta["attention_sinks"] is False
