"""LoRA (Hu et al. 2021) on the attention projections, optionally the router and the experts; the experts'
base weights stay frozen in MXFP4.

y = x Wᵀ + b + (alpha/rank) · dropout(x) Aᵀ Bᵀ, with A [r, in] random and B [out, r] zero, so training
starts from the base model exactly. A LoRALinear keeps the base `weight`/`bias` under their own names (the
checkpoint names do not move) and adds `lora_A`/`lora_B`; everything else in the model is frozen, so only
the adapters get gradients and optimizer state. The MoE experts stay MXFP4Weight: the forward dequantizes
one expert at a time and the backward recomputes it (model._MXFP4Linear), so no dense expert is kept.

On the experts (target "experts"): each expert e of a layer gets its own pair per projection, mlp1 (the fused
gate/up, [2I, D]) and mlp2 ([D, I]): W_e + (alpha/rank)·B_e·A_e, as PEFT's adapters on parameters
(`target_parameters`, one rank-r pair per expert). The update is added to the output of the expert's MXFP4
product for the tokens routed to it (model.MoE._grouped), so no expert is ever held dense: the adapters cost
E·r·(in + out) numbers per projection, 0.4–0.5 % of an expert stack at rank 8 on gpt-oss-20b.

`merge_lora` folds B·A·(alpha/rank) into the base weights; the saved checkpoint (train/loop.py
`export_tensors`) writes merged weights and the expert blocks/scales exactly as they were loaded.
`save_peft_adapter` writes the adapters alone in PEFT's format for transformers' GptOss (`adapter_config.json` +
`adapter_model.safetensors`), loadable with `peft.PeftModel.from_pretrained` onto the base checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..model import Linear, Transformer

# [lora] targets → the Linear modules they adapt (names as in the checkpoint: block.N.attn.qkv, ...)
LINEAR_TARGETS = {"qkv": "attn.qkv", "out": "attn.out", "gate": "mlp.gate"}  # gate = the MoE router
TARGETS = [*LINEAR_TARGETS, "experts"]  # experts: every expert's mlp1 and mlp2 (ExpertLoRA)


class LoRALinear(Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) parameters, same names
        self.scaling = alpha / rank
        a = torch.empty(rank, base.in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(base.in_features)  # PEFT's kaiming_uniform(a=√5) bound
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return super().forward(x) + self.scaling * delta

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/rank)·B·A in the base weight's dtype (fp32 math)."""
        w = self.weight.detach().float() + self.scaling * (self.lora_B.detach() @ self.lora_A.detach())
        return w.to(self.weight.dtype)


class StackedLoRA(nn.Module):
    """Adapters for a stack of E expert weights [E, out, in]: lora_A [E, r, in] (random), lora_B [E, out, r]
    (zero); expert e's update is scaling·B[e]·A[e]."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, rank: int, scaling: float,
                 generator: torch.Generator, device=None):
        super().__init__()
        self.scaling = scaling
        a = torch.empty(num_experts, rank, in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(in_features)  # as LoRALinear (PEFT's kaiming_uniform(a=√5) bound)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device))

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """The update of expert e's output for its tokens x [n, in] → [n, out]."""
        return self.scaling * ((x @ self.lora_A[e].t().to(x.dtype)) @ self.lora_B[e].t().to(x.dtype))


class ExpertLoRA(nn.Module):
    """The adapters of one MoE layer's experts: mlp1 (gate/up, interleaved rows as in the checkpoint) and mlp2."""

    def __init__(self, config, rank: int, alpha: float, generator: torch.Generator, device=None):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.mlp1 = StackedLoRA(E, 2 * I, D, rank, alpha / rank, generator, device)
        self.mlp2 = StackedLoRA(E, D, I, rank, alpha / rank, generator, device)


def add_lora(model: Transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
             seed: int = 0) -> list[nn.Parameter]:
    """Freeze every parameter of `model`, put adapters on the targets of every block; returns the adapters'
    parameters (the only trainable ones). Deterministic in `seed`."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r}; known targets: {', '.join(TARGETS)}")
    if "experts" in targets and model.config.mlp_type != "moe":
        raise ConfigError(f"LoRA target 'experts' needs a MoE model; this one's FFN is {model.config.mlp_type!r}")
    if "experts" in targets and dropout:
        raise ConfigError("LoRA target 'experts' takes no dropout (PEFT's adapters on expert parameters have "
                          "none): set [lora] dropout = 0")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    trainable = []
    for block in model.block:
        for t in targets:
            if t == "experts":
                device = block.mlp.mlp1_bias.device
                block.mlp.expert_lora = ExpertLoRA(model.config, rank, alpha, g, device)
                trainable += list(block.mlp.expert_lora.parameters())
                continue
            parent_name, attr = LINEAR_TARGETS[t].split(".")
            parent = getattr(block, parent_name)
            adapter = LoRALinear(getattr(parent, attr), rank, alpha, dropout, g)
            setattr(parent, attr, adapter)
            trainable += [adapter.lora_A, adapter.lora_B]
    return trainable


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_experts(base: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                   adapter: tuple[torch.Tensor, torch.Tensor, float]) -> Iterator[torch.Tensor]:
    """Expert by expert, W_e + scaling·B_e·A_e in fp32 [out, in]. base: a dense stack [E, out, in] or MXFP4
    (blocks, scales); adapter: (lora_A [E, r, in], lora_B [E, out, r], scaling), a StackedLoRA's or a state
    dict's."""
    from .. import mxfp4

    A, B, scaling = adapter
    for e in range(A.shape[0]):
        w = (mxfp4.dequantize(base[0][e], base[1][e], torch.float32) if isinstance(base, tuple)
             else base[e].detach().float())
        yield w + scaling * (B[e].detach().float().to(w.device) @ A[e].detach().float().to(w.device))


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put a plain Linear back (in place; returns the model).
    Expert adapters over MXFP4 experts are merged by re-quantizing each expert to MXFP4: the update is rounded
    onto the FP4 grid (lossy; an update smaller than half a grid step vanishes), which the adapter alone,
    applied on the MXFP4 base, avoids."""
    from ..checkpoint import dense_experts_to_mxfp4
    from ..model import MXFP4Weight

    for i, block in enumerate(model.block):
        lora, m = block.mlp.expert_lora, block.mlp
        if lora is None:
            continue
        for name, stack in (("mlp1_weight", lora.mlp1), ("mlp2_weight", lora.mlp2)):
            w, adapter = getattr(m, name), (stack.lora_A, stack.lora_B, stack.scaling)
            if isinstance(w, MXFP4Weight):  # re-quantized as the saved checkpoint is (loop.export_tensors)
                (_, blocks), (_, scales) = dense_experts_to_mxfp4(f"block.{i}.mlp.{name}.weight",
                                                                  merged_experts((w.blocks, w.scales), adapter))
                w.blocks.copy_(blocks)
                w.scales.copy_(scales)
            else:
                with torch.no_grad():
                    for e, merged in enumerate(merged_experts(w.weight, adapter)):
                        w.weight[e] = merged.to(w.weight.dtype)
        m.expert_lora = None
    for name, m in lora_modules(model).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight(), requires_grad=m.weight.requires_grad)
        plain.bias = m.bias
        setattr(parent, attr, plain)
    return model


# Our fused qkv projection is three in transformers' GptOss (q_proj, k_proj, v_proj). Its update s·B·A splits
# exactly by rows of B: q_proj gets (A, B[:H·Dh]), k_proj (A, B[H·Dh:(H+K)·Dh]), v_proj (A, the rest) — one A
# shared, as if each had the same down-projection. The router (our "gate") is no nn.Linear in transformers'
# GptOss (GptOssTopKRouter), so PEFT cannot hold an adapter for it.
# The experts' adapters are PEFT's adapters on parameters (target_parameters): PEFT wraps the experts module once
# per parameter, in the order listed, so gate_up_proj's pair sits under `experts.base_layer.` and down_proj's
# under `experts.`. Its layout per projection: lora_A.weight [E·r, in] (expert e's rows e·r … e·r + r − 1),
# lora_B.weight [out, r·E] (expert e's columns e, e + E, …: a reshape to [out, r, E]).
PEFT_MODULES = {"qkv": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",), "experts": ()}
PEFT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
PEFT_EXPERT_PREFIX = {"mlp1": "mlp.experts.base_layer", "mlp2": "mlp.experts"}


def peft_tensors(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA model's state dict under PEFT's names for transformers' GptOssForCausalLM."""
    out = {}
    H, K, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    bounds = {"q_proj": (0, H * Dh), "k_proj": (H * Dh, (H + K) * Dh), "v_proj": ((H + K) * Dh, (H + 2 * K) * Dh)}
    for name, a in state.items():
        if not name.endswith(".lora_A"):
            continue
        owner = name[: -len(".lora_A")]  # block.N.attn.qkv, or block.N.mlp.expert_lora.mlp1
        b = state[owner + ".lora_B"]
        if ".expert_lora." in owner:
            layer, which = owner.split(".")[1], owner.rsplit(".", 1)[1]
            E, out_features, r = b.shape
            prefix = f"base_model.model.model.layers.{layer}.{PEFT_EXPERT_PREFIX[which]}"
            out[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().reshape(E * r, -1).contiguous()
            out[f"{prefix}.lora_B.weight"] = b.detach().float().cpu().permute(1, 2, 0).reshape(out_features, r * E).contiguous()
            continue
        _, layer, sub, target = owner.split(".")
        kind = {"attn.qkv": "qkv", "attn.out": "out", "mlp.gate": "gate"}[f"{sub}.{target}"]
        if kind not in PEFT_MODULES:
            raise ConfigError(f"LoRA target {kind!r} ({owner}) has no PEFT counterpart in transformers' GptOss "
                              "(its router is not an nn.Linear); the merged checkpoint holds it")
        for module in PEFT_MODULES[kind]:
            lo, hi = bounds.get(module, (0, b.shape[0]))
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = a.detach().float().cpu().clone()  # a copy each: safetensors refuses shared memory
            out[f"{prefix}.lora_B.weight"] = b[lo:hi].detach().float().cpu().contiguous()
    return out


def save_peft_adapter(model: Transformer, path: str | Path, rank: int, alpha: float, targets: list[str],
                      dropout: float = 0.0, base_model: str | None = None,
                      state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters on their own as a PEFT LoRA adapter for transformers' GptOss: adapter_config.json +
    adapter_model.safetensors. state: the full state dict if not the model's own (gathered FSDP shards)."""
    from ..safetensors_io import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(model.state_dict() if state is None else state, model.config)
    save_file(tensors, path / "adapter_model.safetensors")
    modules = [m for t in targets for m in PEFT_MODULES[t]]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": modules,
              "target_parameters": list(PEFT_PARAMETERS) if "experts" in targets else None,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
