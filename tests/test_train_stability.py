"""Stability variants (OLMo-2 post-norm, QK-norm) and the spike score."""

from __future__ import annotations

import torch

import gptoss
from gptoss import synthetic
from gptoss.config import ModelConfig, preset
from gptoss.train import TrainConfig, train
from gptoss.train.stability import SpikeMeter
from test_train import permutation_task


def test_spike_meter_flags_exactly_the_outliers():
    g = torch.Generator().manual_seed(0)
    values = (1 + 0.01 * torch.randn(90, generator=g)).tolist()
    values[40] = 1.5  # ≈ 50 σ above the rolling mean
    values[50] = 1.05  # ≈ 5 σ: not a spike
    values[70] = 0.5  # ≈ 50 σ below: OLMo-2 counts either side
    meter = SpikeMeter(window=20)
    scores = [meter.add(v) for v in values]
    assert [i for i, s in enumerate(meter.spikes) if s] == [40, 70]
    assert scores[39] == 0 and scores[40] == 100 / 41 and scores[89] == 100 * 2 / 90  # % of the whole series
    assert SpikeMeter(window=20).add(float("nan")) == 100.0


def random_model(**variant) -> gptoss.Transformer:
    config = preset("tiny").replace(vocab_size=64, **variant)
    model = gptoss.Transformer(config, dtype=torch.float32)
    state = dict(synthetic.random_tensors(preset("tiny").replace(vocab_size=64), seed=0, dtype=torch.float32))
    model.load_state_dict(state, strict=False)  # q/k norm scales keep their init (ones)
    return model.dense_experts().eval()


def scaled_logits(model, tokens, names: list[str], rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        before = model(tokens)
        for name, p in model.named_parameters():
            if any(name.endswith(n) for n in names):
                (p[rows] if rows is not None else p).mul_(3.0)
        return before, model(tokens)


def test_qk_norm_makes_attention_blind_to_query_and_key_scale():
    """Scaling the query and key projections by 3 changes nothing with QK-norm (the norm removes it) and
    changes the logits without it."""
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    c = preset("tiny")
    qk_rows = slice(0, (c.num_attention_heads + c.num_key_value_heads) * c.head_dim)
    before, after = scaled_logits(random_model(qk_norm="per_head"), tokens, ["attn.qkv.weight", "attn.qkv.bias"], qk_rows)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    before, after = scaled_logits(random_model(), tokens, ["attn.qkv.weight", "attn.qkv.bias"], qk_rows)
    assert (after - before).abs().max() > 1e-2


def test_post_norm_normalizes_each_sublayer_output():
    """OLMo-2 placement: x + norm(attn(x)), so scaling the attention output projection changes nothing; with
    GPT-oss's pre-norm it does."""
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    eps = 1e-12  # the norm's epsilon is the only scale it sees; make it negligible against small outputs
    post = random_model(norm_placement="post", rms_norm_eps=eps)
    before, after = scaled_logits(post, tokens, ["attn.out.weight", "attn.out.bias"])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    before, after = scaled_logits(random_model(rms_norm_eps=eps), tokens, ["attn.out.weight", "attn.out.bias"])
    assert (after - before).abs().max() > 1e-2


def test_variants_train_log_spike_scores_and_round_trip_the_config(tmp_path):
    cfg = TrainConfig.from_dict({
        "model": {"preset": "tiny", "vocab_size": 64, "num_hidden_layers": 2, "norm_placement": "post",
                  "qk_norm": "olmo2"},
        "data": {"seq_len": 64, "batch_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "train": {"steps": 30, "out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32",
                  "spike_window": 10}})
    result = train(cfg, documents=permutation_task(), progress=False)
    entropy = result.dataset.unigram_entropy()
    assert result.losses[-1] < 0.7 * entropy, (result.losses[-1], entropy)  # ≈ 0.6 after 30 steps
    assert all(0 <= m["spike_score_grad_norm"] <= 100 and 0 <= m["spike_score_loss"] <= 100 for m in result.metrics)
    assert not (result.checkpoint / "model").exists()  # QK-norm has no slot in GPT-oss checkpoints
    post = ModelConfig.from_dict(preset("tiny").replace(norm_placement="post").to_hf_dict())
    assert post.norm_placement == "post" and "norm_placement" not in preset("tiny").to_hf_dict()
