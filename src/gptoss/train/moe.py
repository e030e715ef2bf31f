"""MoE training: router losses, auxiliary-loss-free bias balancing, and per-layer load metrics.

The MoE layers record their routing while `record_routing` is on (model.MoE.routing: router logits [N, E]
and the chosen experts [N, k], −1 where an assignment was dropped for capacity); everything here reads those.
- Load-balancing loss, Switch Transformer (Fedus et al. 2021, eq. 4–6) in the form transformers uses for
  GptOss/Mixtral (`load_balancing_loss_func`): over the tokens of all layers together,
  E · Σ_e f_e · P_e with f_e the fraction of tokens choosing expert e among their top-k (counts, no gradient)
  and P_e the mean softmax probability of e over all experts. Balanced routing gives k.
- Router z-loss, ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)², averaged over layers.
- Bias balancing, DeepSeek-V3 (§2.1.2): a per-expert bias added to the logits for top-k selection only;
  after each step b_e += γ · sign(mean load − load_e).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..model import MoE, Transformer


def moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def collapse_router(model: Transformer) -> None:
    """Make every token prefer experts 0 and 1 by a wide margin (router bias 2 vs 0): the collapsed start of
    the balancing tests and of `gptoss experiment routing --start collapsed`."""
    with torch.no_grad():
        for m in moe_layers(model):
            m.gate.bias.zero_()
            m.gate.bias[:2] = 2.0


def record_routing(model: Transformer, on: bool = True) -> None:
    for m in moe_layers(model):
        m.record_routing = on
        m.routing = None


def load_balancing_loss(router_logits: list[torch.Tensor], experts: list[torch.Tensor],
                        num_experts: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` (no attention mask): logits [N, E] and top-k choices [N, k]
    per layer (choices made before any capacity drop).

    reduce (data parallel: a sum over ranks): f_e and the token count then cover the whole global micro-batch
    and P_e is this rank's share of the probability sum, so the ranks' losses add up to the one-process loss
    (gradients included: f_e carries none)."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    rows = 0
    for logits, chosen in zip(router_logits, experts):
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + torch.softmax(logits.float(), dim=-1).sum(0)
        rows += logits.shape[0]
    if reduce is not None:
        counts = reduce(counts)
        rows = reduce(torch.tensor(float(rows), device=counts.device))
    return num_experts * (counts / rows * prob_sum / rows).sum()


def z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.logsumexp(x.float(), dim=-1).pow(2).mean() for x in router_logits]).mean()


def router_losses(model: Transformer, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of the forward just run with routing recorded; `reduce`: see
    load_balancing_loss (the z-loss is a per-token mean: the ranks' mean equals the global one)."""
    layers = [m for m in moe_layers(model) if m.routing is not None]
    if not layers:  # a dense FFN (mlp_type = "gelu"/"swiglu"): no router
        zero = torch.zeros((), device=model.device)
        return zero, zero
    logits = [m.routing.logits for m in layers]
    chosen = [m.routing.selected for m in layers]
    E = model.config.num_experts
    return load_balancing_loss(logits, chosen, E, reduce), z_loss(logits)


class LoadMeter:
    """Accumulates, per layer, how many assignments each expert got and how many were dropped, over the
    micro-batches of one step."""

    def __init__(self, num_layers: int, num_experts: int):
        self.selected = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.dropped = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, model: Transformer) -> None:
        E = self.selected.shape[1]
        for i, m in enumerate(moe_layers(model)):
            if m.routing is None:
                continue
            sel = m.routing.selected.reshape(-1).cpu()
            self.selected[i] += torch.bincount(sel, minlength=E).double()
            self.dropped[i] += float((m.routing.experts.reshape(-1) < 0).sum())

    def metrics(self) -> dict:
        """Per layer: load (fraction of assignments per expert), its entropy (nats; log E is perfectly
        balanced), max/mean load, and the percentage of assignments dropped for capacity."""
        total = self.selected.sum(1, keepdim=True).clamp(min=1)
        load = self.selected / total
        entropy = -(load * load.clamp(min=1e-30).log()).sum(1)
        E = load.shape[1]
        return {"expert_load": [[round(x, 6) for x in row] for row in load.tolist()],
                "load_entropy": [round(x, 6) for x in entropy.tolist()],
                "load_max_over_mean": [round(x, 6) for x in (load.max(1).values * E).tolist()],
                "dropped_pct": [round(x, 6) for x in (100 * self.dropped / total[:, 0]).tolist()]}


def update_expert_bias(model: Transformer, selected_counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the
    over-loaded ones, by a fixed step `rate`. selected_counts [layers, E] from this step's routing."""
    for m, counts in zip(moe_layers(model), selected_counts):
        if m.expert_bias is None:
            continue
        counts = counts.to(m.expert_bias.device, torch.float32)
        m.expert_bias += rate * torch.sign(counts.mean() - counts)


def max_entropy(num_experts: int) -> float:
    return math.log(num_experts)
