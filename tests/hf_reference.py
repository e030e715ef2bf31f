"""Random small GPT-oss models built with transformers' GptOssForCausalLM (the outside reference).

`make_reference` builds one, rounds its expert weights onto the MXFP4 grid (so both sides hold the same
numbers), and writes it as a real Hugging Face checkpoint folder with MXFP4 experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptoss import mxfp4
from gptoss.checkpoint import write_checkpoint
from gptoss.config import ModelConfig


def hf_config(config: ModelConfig):
    from transformers import GptOssConfig

    d = config.to_hf_dict()
    d.pop("quantization_config")
    d.pop("architectures")
    d.pop("model_type")
    rope = d.pop("rope_scaling")
    d["rope_parameters"] = {**rope, "rope_theta": d.pop("rope_theta")}
    return GptOssConfig(**d)


def random_hf_model(config: ModelConfig, seed: int = 0):
    """A GptOssForCausalLM in fp32 with weights large enough that attention is far from uniform."""
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(hf_config(config)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))  # nonzero sinks, both signs
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "experts.gate_up_proj" in name or "experts.down_proj" in name:
                scale = 0.5 if name.endswith("bias") else 0.15
                p.copy_(scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for param in (experts.gate_up_proj, experts.down_proj):  # HF keeps [E, in, out]
                blocks, scales = mxfp4.quantize(param.transpose(1, 2))
                param.copy_(mxfp4.dequantize(blocks, scales, torch.float32).transpose(1, 2))
    return model


def original_tensors(model, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF model's weights under original names, experts quantized to MXFP4 (exact: already on the grid)."""
    out = {"embedding.weight": model.model.embed_tokens.weight, "norm.scale": model.model.norm.weight,
           "unembedding.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        out |= {
            f"block.{i}.attn.norm.scale": layer.input_layernorm.weight,
            f"block.{i}.attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            f"block.{i}.attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            f"block.{i}.attn.sinks": a.sinks,
            f"block.{i}.attn.out.weight": a.o_proj.weight,
            f"block.{i}.attn.out.bias": a.o_proj.bias,
            f"block.{i}.mlp.norm.scale": layer.post_attention_layernorm.weight,
            f"block.{i}.mlp.gate.weight": m.router.weight,
            f"block.{i}.mlp.gate.bias": m.router.bias,
            f"block.{i}.mlp.mlp1_bias": m.experts.gate_up_proj_bias,
            f"block.{i}.mlp.mlp2_bias": m.experts.down_proj_bias,
        }
        for ours, param in (("mlp1_weight", m.experts.gate_up_proj), ("mlp2_weight", m.experts.down_proj)):
            blocks, scales = mxfp4.quantize(param.transpose(1, 2))
            out[f"block.{i}.mlp.{ours}.blocks"] = blocks
            out[f"block.{i}.mlp.{ours}.scales"] = scales
    return {k: v.detach().contiguous() for k, v in out.items()}


def make_reference(config: ModelConfig, path: Path, seed: int = 0, layout: str = "hf",
                   max_shard_bytes: int = 2**20):
    """Build the transformers model and write it to `path` (sharded, so the index is exercised)."""
    model = random_hf_model(config, seed)
    write_checkpoint(original_tensors(model, config), config, path, layout, max_shard_bytes=max_shard_bytes)
    return model


def load_with_transformers(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' own reader of an MXFP4 HF checkpoint (dequantized on CPU)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=dtype).eval()
