"""LoRA (Hu et al. 2021) on the attention projections (and optionally the router), experts frozen in MXFP4.

y = x Wᵀ + b + (alpha/rank) · dropout(x) Aᵀ Bᵀ, with A [r, in] random and B [out, r] zero, so training
starts from the base model exactly. A LoRALinear keeps the base `weight`/`bias` under their own names (the
checkpoint names do not move) and adds `lora_A`/`lora_B`; everything else in the model is frozen, so only
the adapters get gradients and optimizer state. The MoE experts stay MXFP4Weight: the forward dequantizes
one expert at a time and the backward recomputes it (model._MXFP4Linear), so no dense expert is kept.

`merge_lora` folds B·A·(alpha/rank) into the base weights; the saved checkpoint (train/loop.py
`export_tensors`) writes merged weights and the expert blocks/scales exactly as they were loaded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..model import Linear, Transformer

# [lora] targets → the Linear modules they adapt (names as in the checkpoint: block.N.attn.qkv, ...)
TARGETS = {"qkv": "attn.qkv", "out": "attn.out", "gate": "mlp.gate"}  # gate = the MoE router


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


def add_lora(model: Transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
             seed: int = 0) -> list[nn.Parameter]:
    """Freeze every parameter of `model`, put adapters on the targets of every block; returns the adapters'
    parameters (the only trainable ones). Deterministic in `seed`."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r}; known targets: {', '.join(TARGETS)}")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    trainable = []
    for block in model.block:
        for t in targets:
            parent_name, attr = TARGETS[t].split(".")
            parent = getattr(block, parent_name)
            adapter = LoRALinear(getattr(parent, attr), rank, alpha, dropout, g)
            setattr(parent, attr, adapter)
            trainable += [adapter.lora_A, adapter.lora_B]
    return trainable


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put a plain Linear back (in place; returns the model)."""
    for name, m in lora_modules(model).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight(), requires_grad=m.weight.requires_grad)
        plain.bias = m.bias
        setattr(parent, attr, plain)
    return model
