"""The model against transformers' GptOssForCausalLM on random small models written as real checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import gptoss
from gptoss.config import ModelConfig
from hf_reference import load_with_transformers, make_reference, original_tensors
from gptoss.checkpoint import write_checkpoint

SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, num_experts=8, intermediate_size=64, sliding_window=8, initial_context_length=64,
             max_position_embeddings=2048)
CONFIGS = {
    "top4": ModelConfig(**SMALL, experts_per_token=4),
    "top2": ModelConfig(**SMALL, experts_per_token=2),
    # GQA with 4 query heads per kv head and a YaRN range that falls inside head_dim, as in the real model
    "gqa4": ModelConfig(**{**SMALL, "num_attention_heads": 8, "head_dim": 32, "initial_context_length": 4096,
                           "max_position_embeddings": 131072},
                        experts_per_token=4),
}
T = 64  # > 48 and 8x the sliding window


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, tmp_path_factory):
    config = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf_memory = make_reference(config, path, seed=list(CONFIGS).index(request.param))
    hf = load_with_transformers(path)  # transformers reading the MXFP4 checkpoint we wrote
    tokens = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        assert torch.equal(hf_logits, hf_memory(tokens).logits), "transformers read back different weights"
    return config, path, hf, hf_memory, tokens, hf_logits


def test_fp32_parity_with_transformers(reference):
    config, path, _, _, tokens, hf_logits = reference
    model = gptoss.load(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, T, config.vocab_size)
    err = (logits - hf_logits).abs().max().item()
    assert err <= 1e-4 * hf_logits.abs().max().item(), err
    assert torch.equal(logits.argmax(-1), hf_logits.argmax(-1))


def test_window_and_sinks_matter(reference):
    """Guards the test itself: a model without the window or without sinks must fail parity."""
    config, path, _, _, tokens, hf_logits = reference
    for broken in ("no window", "no sinks"):
        model = gptoss.load(path, dtype=torch.float32)
        for block in model.block:
            if broken == "no window":
                block.attn.sliding_window = None
            else:
                block.attn.sinks.fill_(-1e9)
        with torch.no_grad():
            err = (model(tokens) - hf_logits).abs().max().item()
        assert err > 1e-2 * hf_logits.abs().max().item()


def test_original_layout_gives_identical_logits(reference, tmp_path):
    config, path, _, hf_memory, tokens, _ = reference
    write_checkpoint(original_tensors(hf_memory, config), config, tmp_path / "original", layout="original")
    a, b = gptoss.load(path, dtype=torch.float32), gptoss.load(tmp_path / "original", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_bf16_no_worse_than_transformers(reference):
    """Random models have near-tied router logits, so bf16 is judged by its error against fp32, side by side.
    Which of two bf16 models errs less is a coin flip decided by a few flipped expert choices: over 3 seeds x
    2 configs the ratio ranged 0.56-1.28 on 2 x 64 tokens and 0.77-1.09 on 16 x 64 (so, 16 rows here, and a
    bound that a systematic defect, errors twice transformers', still fails)."""
    config, path, hf, _, _, _ = reference
    tokens = torch.randint(0, config.vocab_size, (16, T), generator=torch.Generator().manual_seed(8))
    ours = gptoss.load(path, dtype=torch.bfloat16)
    theirs = load_with_transformers(path, dtype=torch.bfloat16)
    with torch.no_grad():
        fp32_logits = hf(tokens).logits
        ours_err = (ours(tokens).float() - fp32_logits).abs().mean().item()
        theirs_err = (theirs(tokens).logits.float() - fp32_logits).abs().mean().item()
    print(f"\nbf16 mean |Δlogit| vs fp32 [{config.experts_per_token=}]: gptoss {ours_err:.4f}, "
          f"transformers {theirs_err:.4f}")
    assert ours_err <= theirs_err * 1.25, (ours_err, theirs_err)


def test_expert_storage_is_the_checkpoint_bytes(reference):
    """Experts stay MXFP4 after loading: same bytes as on disk, uint8, no dense copy anywhere."""
    config, path, _, _, _, _ = reference
    model = gptoss.load(path, dtype=torch.bfloat16)
    assert model.expert_nbytes() == gptoss.checkpoint.expert_bytes_on_disk(path)
    state = model.state_dict()
    assert all(t.dtype == torch.uint8 for n, t in state.items() if "_weight." in n)
    float_numel = sum(t.numel() for t in state.values() if t.is_floating_point())
    spec = gptoss.checkpoint.expected_tensors(config)
    assert float_numel == sum(math.prod(shape) for shape, kind in spec.values() if kind == "float")
