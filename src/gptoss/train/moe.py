"""MoE training: router losses, auxiliary-loss-free bias balancing, and per-layer load metrics.

The MoE layers record their routing while `record_routing` is on (model.MoE.routing: router logits [N, E]
and the chosen experts [N, k], −1 where an assignment was dropped for capacity); everything here reads those.
- Load-balancing loss, Switch Transformer (Fedus et al. 2021, §2.2, eq. 4–6): per MoE layer
  N_E · Σ_e f_e · P_e, with f_e the fraction of tokens dispatched to expert e (eq. 5) and P_e the mean router
  probability of e over all experts (eq. 6); "For each Switch layer, this auxiliary loss is added to the total
  model loss", so the layers' losses are summed. Switch routes top-1 (Σ_e f_e = 1); for top-k we count each
  token's k choices (Σ_e f_e = k, as transformers' GptOss/Mixtral do), so a balanced layer gives k and a layer
  whose every token picks the same k experts gives E.
  `aux_loss = "pooled"` keeps transformers' `load_balancing_loss_func`, which pools the counts and
  probabilities of all layers before the product: expert e of layer 0 and expert e of layer 1 are then one
  expert, and layers that collapse onto different experts look balanced (a known problem there).
- Router z-loss, ST-MoE (Zoph et al. 2022, §3.1, eq. 5): per router, the mean over tokens of
  logsumexp(logits)²; summed over the MoE layers like the load-balancing loss.
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


def collapse_router_by_layer(model: Transformer) -> None:
    """Make every token of layer i prefer experts i·k … i·k + k − 1 (mod E) by a wide margin (router bias 2 vs
    0): layers collapsed onto *different* experts. With E = L·k every expert is used by exactly one layer, so
    the statistics pooled over layers look perfectly balanced while each layer uses k of its E experts (the
    start of `gptoss experiment routing --start staggered`)."""
    with torch.no_grad():
        for i, m in enumerate(moe_layers(model)):
            k, E = m.config.experts_per_token, m.config.num_experts
            m.gate.bias.zero_()
            m.gate.bias[[(i * k + j) % E for j in range(k)]] = 2.0


def record_routing(model: Transformer, on: bool = True) -> None:
    for m in moe_layers(model):
        m.record_routing = on
        m.routing = None


AUX_LOSS_MODES = ("per_layer", "pooled")


def switch_loss_per_layer(router_logits: list[torch.Tensor], experts: list[torch.Tensor], num_experts: int,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (§2.2, eq. 4 without α) of each MoE layer → [layers].

    router_logits [N, E] and top-k choices [N, k] per layer (choices made before any capacity drop).
    f_e = (assignments to e) / N (no gradient: a count), P_e = mean over tokens of softmax(logits)_e.
    reduce (data parallel: a sum over ranks): f_e and N then cover the whole global micro-batch and P_e is
    this rank's share of the probability sum, so the ranks' losses add up to the one-process loss (gradients
    included: f_e carries none)."""
    device = router_logits[0].device
    counts = torch.stack([torch.bincount(c.reshape(-1), minlength=num_experts).float() for c in experts])  # (L, E)
    prob_sum = torch.stack([torch.softmax(x.float(), dim=-1).sum(0) for x in router_logits])  # (L, E)
    rows = torch.tensor([float(x.shape[0]) for x in router_logits], device=device)  # (L,)
    if reduce is not None:
        counts, rows = reduce(counts), reduce(rows)
    f = counts / rows[:, None]
    P = prob_sum / rows[:, None]
    return num_experts * (f * P).sum(-1)


def load_balancing_loss(router_logits: list[torch.Tensor], experts: list[torch.Tensor], num_experts: int,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        mode: str = "per_layer") -> torch.Tensor:
    """The load-balancing loss to add (times its coefficient α) to the LM loss.

    mode "per_layer" (Switch, §2.2): the sum over MoE layers of switch_loss_per_layer.
    mode "pooled" (transformers' `load_balancing_loss_func`, no attention mask): one Switch product over the
    tokens of all layers together (counts and probability sums pooled, N = layers × tokens)."""
    if mode == "per_layer":
        return switch_loss_per_layer(router_logits, experts, num_experts, reduce).sum()
    if mode != "pooled":
        raise ValueError(f"aux_loss mode must be one of {AUX_LOSS_MODES}, got {mode!r}")
    pooled_logits = [torch.cat([x.float() for x in router_logits])]
    pooled_experts = [torch.cat([c.reshape(c.shape[0], -1) for c in experts])]
    return switch_loss_per_layer(pooled_logits, pooled_experts, num_experts, reduce)[0]


def z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss (§3.1, eq. 5 without its coefficient): per layer (1/N) Σ_i logsumexp(x_i)²,
    summed over the MoE layers (each router adds its own, as ST-MoE adds it per MoE layer)."""
    return torch.stack([torch.logsumexp(x.float(), dim=-1).pow(2).mean() for x in router_logits]).sum()


def router_losses(model: Transformer, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  aux_loss: str = "per_layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) of the forward just run with routing recorded; `reduce`: see
    switch_loss_per_layer (the z-loss is a per-token mean: the ranks' mean equals the global one);
    aux_loss: "per_layer" or "pooled" (load_balancing_loss)."""
    layers = [m for m in moe_layers(model) if m.routing is not None]
    if not layers:  # a dense FFN (mlp_type = "gelu"/"swiglu"): no router
        zero = torch.zeros((), device=model.device)
        return zero, zero
    logits = [m.routing.logits for m in layers]
    chosen = [m.routing.selected for m in layers]
    E = model.config.num_experts
    return load_balancing_loss(logits, chosen, E, reduce, aux_loss), z_loss(logits)


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
