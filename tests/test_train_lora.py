"""LoRA fine-tuning of an MXFP4 checkpoint: only adapters train, experts stay MXFP4, merging is exact."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.errors import ConfigError
from gptoss.model import MXFP4Weight
from gptoss.train import TrainConfig, train
from gptoss.train.lora import LoRALinear, merge_lora
from gptoss.train.loop import save_model
from test_train import V, permutation_task


def random_checkpoint(path, layout="hf"):
    config = preset("tiny").replace(vocab_size=V, num_hidden_layers=2, layer_types=())
    write_checkpoint(dict(synthetic.random_tensors(config, seed=3, dtype=torch.float32)), config, path, layout)
    return path


def lora_config(tmp_path, ckpt, steps=8, **lora) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": None, "init_from": str(ckpt)},
        "data": {"seq_len": 32, "batch_size": 4},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "lora": {"rank": 4, "alpha": 8.0, "targets": ["qkv", "out", "gate"], **lora},
        "train": {"steps": steps, "out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32",
                  "save_dtype": "float32"}})


def expert_tensors(path) -> dict[str, bytes]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if name.endswith(("blocks", "scales")):
                    out[name] = st.get_tensor(name).numpy().tobytes()
    return out


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path):
    ckpt = random_checkpoint(tmp_path / "base")
    base = gptoss.load(ckpt, dtype=torch.float32)
    result = train(lora_config(tmp_path, ckpt), documents=permutation_task(n_docs=60, alphabet=V), progress=False)
    model = result.model
    assert result.losses[-1] < result.losses[0] - 0.05, result.losses  # the adapters learn
    # experts were never swapped for dense weights; only adapters are trainable
    assert all(isinstance(b.mlp.mlp1_weight, MXFP4Weight) for b in model.block)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # (A, B) × 3 targets × 2 blocks
    state = load_file(str(result.checkpoint / "train_state.safetensors"))  # AdamW moments: adapters only
    assert {k.split(".")[1] for k in state if k.startswith("optim.")} == {str(i) for i in range(12)}
    shapes = {tuple(state[f"optim.{i}.exp_avg"].shape) for i in range(12)}
    assert shapes == {(4, 64), ((4 + 2 * 2) * 16, 4), (64, 4), (8, 4)}  # A; B of qkv, out, gate
    # every base tensor, parameters and MXFP4 buffers alike, is bit-identical after training
    trained = model.state_dict()
    for name, t in base.state_dict().items():
        assert torch.equal(trained[name], t), name
    assert all(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))

    tokens = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        adapted = model(tokens)
        assert (adapted - base(tokens)).abs().max() > 1e-3  # the adapters change the function
        merged = merge_lora(model)(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())
    # the checkpoint written at the end: merged weights (fp32), expert bytes exactly those of the input
    saved = result.checkpoint / "model"
    reloaded = gptoss.load(saved, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), merged, rtol=1e-5, atol=1e-5 * merged.abs().max().item())
    ours, theirs = expert_tensors(saved), expert_tensors(ckpt)
    assert len(theirs) == 8 and ours == theirs
    # the other layout (names differ, bytes do not)
    save_model(model, tmp_path / "original", layout="original", dtype=torch.float32)
    with torch.no_grad():
        again = gptoss.load(tmp_path / "original", dtype=torch.float32)(tokens)
    torch.testing.assert_close(again, merged, rtol=1e-5, atol=1e-5 * merged.abs().max().item())
    assert sorted(expert_tensors(tmp_path / "original").values()) == sorted(theirs.values())


def test_lora_train_state_keeps_only_the_adapters_and_resumes_exactly(tmp_path):
    """A LoRA run's train state holds the adapters and their AdamW moments, not the frozen base (13 GB on the
    20b); resuming from it rebuilds the base from init_from and continues bit for bit."""
    import shutil

    ckpt = random_checkpoint(tmp_path / "base")
    docs = permutation_task(n_docs=40, alphabet=V)
    cfg = lora_config(tmp_path, ckpt, steps=6)
    cfg.train.save_every = 3
    full = train(cfg, documents=docs, progress=False)
    state = load_file(str(tmp_path / "run" / "step-000003" / "train_state.safetensors"))
    weights = {k for k in state if k.startswith("model.")}
    assert weights and all(k.endswith(("lora_A", "lora_B")) for k in weights)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "run" / "step-000003", resumed / "step-000003")
    cfg.train.out_dir, cfg.train.resume = str(resumed), True
    again = train(cfg, documents=docs, progress=False)
    assert again.losses == full.losses[3:]
    for (name, a), b in zip(full.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    cfg.lora.rank = 2  # other adapters than the saved ones: refused, naming the file
    with pytest.raises(ConfigError, match="train_state.safetensors"):
        train(cfg, documents=docs, progress=False)


def test_mxfp4_expert_gradients_equal_dense_expert_gradients():
    """The recomputing MXFP4 backward gives the gradients of the same experts held dense (float64-free
    check in fp32: MXFP4 values are exact in fp32)."""
    config = preset("tiny").replace(vocab_size=V, num_hidden_layers=1, layer_types=())
    q = gptoss.Transformer(config, dtype=torch.float32)
    q.load_state_dict(dict(synthetic.random_tensors(config, seed=1, dtype=torch.float32)), strict=True)
    d = gptoss.Transformer(config, dtype=torch.float32)
    d.load_state_dict(q.state_dict())
    d.dense_experts()
    tokens = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (q, d):
        m.requires_grad_(False)
        m.block[0].attn.qkv.weight.requires_grad_(True)
        m.block[0].mlp.mlp1_bias.requires_grad_(True)
        m(tokens).square().mean().backward()
        grads.append((m.block[0].attn.qkv.weight.grad, m.block[0].mlp.mlp1_bias.grad))
    for a, b in zip(*grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lora_config_errors(tmp_path):
    ckpt = tmp_path / "x"
    with pytest.raises(ConfigError, match=r"\[lora\] field 'targets'"):
        lora_config(tmp_path, ckpt, targets=["mlp1"])
    with pytest.raises(ConfigError, match=r"\[lora\] needs \[model\] init_from"):
        TrainConfig.from_dict({"lora": {"rank": 4}})
