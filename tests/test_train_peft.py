"""LoRA adapters saved in PEFT's format load with `peft` onto transformers' GptOss and give our LoRA model's logits
(the `small` preset's shape, random weights); the merged checkpoint saved beside them gives the same."""

from __future__ import annotations

import json

import pytest
import torch

import gptoss
from gptoss.config import preset
from gptoss.train import TrainConfig, train
from gptoss.train.lora import save_peft_adapter
from hf_reference import load_with_transformers, make_reference
from test_train import permutation_task

peft = pytest.importorskip("peft")


CONFIG = preset("small").replace(num_hidden_layers=2, layer_types=())  # the small preset's widths, 2 layers


def lora_run(tmp_path, seed: int, targets: list[str]):
    """A transformers GptOss reference written as the base checkpoint, and 2 LoRA steps (rank 4) on it."""
    hf = make_reference(CONFIG, tmp_path / "base", seed=seed)
    cfg = TrainConfig.from_dict({
        "model": {"preset": None, "init_from": str(tmp_path / "base")},
        "data": {"seq_len": 32, "batch_size": 2},
        "optim": {"lr": 3e-2, "min_lr": 3e-2, "warmup_steps": 0},
        "lora": {"rank": 4, "alpha": 8.0, "targets": targets},
        "train": {"steps": 2, "out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32",
                  "save_dtype": "float32"}})
    return hf, train(cfg, documents=permutation_task(n_docs=20, alphabet=32), progress=False)


def test_peft_loads_our_adapter_onto_transformers_gptoss(tmp_path):
    config = CONFIG
    hf, result = lora_run(tmp_path, 2, ["qkv", "out"])
    adapter = result.checkpoint / "adapter"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8.0
    assert sorted(meta["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    tokens = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = result.model.eval()
    with torch.no_grad():
        base = hf(tokens).logits
        ref = ours(tokens)
        tuned = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
        theirs = tuned(tokens).logits
    assert (ref - base).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(theirs, ref, rtol=1e-4, atol=1e-4)
    # the merged checkpoint of the same step, read by transformers itself
    merged = load_with_transformers(result.checkpoint / "model")
    with torch.no_grad():
        # merging rounds W + BA once in fp32, and this random model's logits reach ±11: a fixed atol of 1e-4 was
        # 1e-5 of their scale, which one logit of 98,304 exceeded on the AMX Xeon (1.16e-4; its fp32 GEMMs sum
        # in another order). 3e-5 of the scale, far below what the adapters change (12 in this run).
        torch.testing.assert_close(merged(tokens).logits, ref, rtol=1e-4, atol=3e-5 * ref.abs().max().item())


def test_router_adapters_have_no_peft_form(tmp_path):
    from gptoss.errors import ConfigError
    from gptoss.train.lora import add_lora

    model = gptoss.Transformer(preset("tiny"), dtype=torch.float32)
    add_lora(model, 2, 4.0, ["qkv", "gate"])
    with pytest.raises(ConfigError, match="'gate'.*no PEFT counterpart"):
        save_peft_adapter(model, tmp_path / "a", 2, 4.0, ["qkv", "gate"])


def test_lora_base_is_bf16_under_bf16_autocast_and_adapters_stay_fp32(tmp_path):
    """[lora] base_dtype "auto": the frozen non-expert weights in bf16 when the forward runs in bf16 (half the
    memory of the 20b's 1.8B of them), experts still MXFP4, adapters fp32 (the optimizer's master copy)."""
    from gptoss.model import MXFP4Weight
    from gptoss.train.loop import build_model
    from test_train_lora import lora_config, random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt")
    cfg = lora_config(tmp_path, ckpt, steps=3)
    cfg.train.dtype = "bfloat16"
    model = build_model(cfg, torch.device("cpu"))
    attn = model.block[0].attn
    assert attn.qkv.weight.dtype == torch.bfloat16 and model.embedding.weight.dtype == torch.bfloat16
    assert attn.qkv.lora_A.dtype == torch.float32 and attn.qkv.lora_A.requires_grad
    assert isinstance(model.block[0].mlp.mlp1_weight, MXFP4Weight)
    result = train(cfg, documents=permutation_task(n_docs=20), progress=False)
    assert result.losses[-1] < result.losses[0]
    cfg.train.dtype, cfg.train.out_dir = "float32", str(tmp_path / "fp32")
    assert build_model(cfg, torch.device("cpu")).block[0].attn.qkv.weight.dtype == torch.float32


def test_expert_adapters_load_in_peft_and_merge(tmp_path):
    """LoRA on the experts (target "experts": every expert's mlp1 and mlp2, their base frozen in MXFP4): PEFT's
    target_parameters adapters on transformers' GptOss give our logits; the merged checkpoint re-quantizes
    each adapted expert onto the MXFP4 grid (within half a grid step of W + s·B·A)."""
    from gptoss import mxfp4
    from gptoss.checkpoint import load
    from gptoss.train.lora import StackedLoRA

    config = CONFIG
    hf, result = lora_run(tmp_path, 3, ["qkv", "experts"])
    ours = result.model.eval()
    stacks = [m for m in ours.modules() if isinstance(m, StackedLoRA)]
    assert len(stacks) == 4 and all(m.lora_B.abs().max() > 0 for m in stacks)  # every expert stack trained
    adapter = result.checkpoint / "adapter"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert meta["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    tokens = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = hf(tokens).logits
        ref = ours(tokens)
        tuned = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
        theirs = tuned(tokens).logits
        only_attn = ours.block[0].mlp.expert_lora
        ours.block[0].mlp.expert_lora = None  # without layer 0's expert adapters the logits move
        assert (ours(tokens) - ref).abs().max() > 1e-3
        ours.block[0].mlp.expert_lora = only_attn
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ref, rtol=1e-4, atol=1e-4)

    merged = load(result.checkpoint / "model", dtype=torch.float32)
    for i, block in enumerate(merged.block):
        lora = ours.block[i].mlp.expert_lora
        for name, stack in (("mlp1_weight", lora.mlp1), ("mlp2_weight", lora.mlp2)):
            w = getattr(block.mlp, name)
            got = mxfp4.dequantize(w.blocks, w.scales, torch.float32)
            base_w = getattr(ours.block[i].mlp, name)
            delta = stack.scaling * (stack.lora_B.detach() @ stack.lora_A.detach())  # s·B_e·A_e, every e
            want = mxfp4.dequantize(base_w.blocks, base_w.scales, torch.float32) + delta
            # per block of 32: nearest rounding misses by at most half the FP4 grid's largest gap (4 → 6), i.e.
            # by one unit of the block's scale
            step = 2.0 ** (w.scales.to(torch.int32) - mxfp4.SCALE_BIAS).float()
            err = (got - want).abs().view(*w.scales.shape, mxfp4.BLOCK).amax(-1)
            assert (err <= step + 1e-6).all(), f"block {i} {name}: merged expert off the grid by more than a gap"
            assert not torch.equal(got, mxfp4.dequantize(base_w.blocks, base_w.scales, torch.float32))

    # merge_lora in memory: on MXFP4 experts the same bytes as the merged checkpoint; on dense experts (the
    # GPU default) exactly W + s·B·A, and the merged model computes what the adapted one did
    import copy

    from gptoss.train.lora import merge_lora

    in_memory = merge_lora(copy.deepcopy(ours))
    for got, want in zip(in_memory.block, merged.block):
        for name in ("mlp1_weight", "mlp2_weight"):
            assert torch.equal(getattr(got.mlp, name).blocks, getattr(want.mlp, name).blocks)
            assert torch.equal(getattr(got.mlp, name).scales, getattr(want.mlp, name).scales)
    dense = copy.deepcopy(ours).dense_experts(torch.float32)
    with torch.no_grad():
        adapted = dense(tokens)
        dense_merged = merge_lora(dense)
        assert all(b.mlp.expert_lora is None for b in dense_merged.block)
        torch.testing.assert_close(dense_merged(tokens), adapted, rtol=1e-4, atol=1e-4 * adapted.abs().max().item())


def test_expert_adapters_refuse_dropout(tmp_path):
    from gptoss.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[lora\] field 'dropout'.*'experts'"):
        TrainConfig.from_dict({"model": {"preset": None, "init_from": str(tmp_path)},
                               "lora": {"rank": 4, "targets": ["experts"], "dropout": 0.1}})
