"""Layers collapsed onto *different* experts: the Switch load-balancing loss per layer vs pooled over layers.

Claim tested (Switch Transformer §2.2: "For each Switch layer, this auxiliary loss is added to the total model
loss"; issue 22): the per-layer loss sees each layer's imbalance, while transformers' pooled form, which sums
expert counts and router probabilities over layers before the product, cannot see layers that collapse onto
different experts. Start (`collapse_router_by_layer`): layer 0's router prefers experts {0, 1}, layer 1's
{2, 3} (gate bias +2); with 4 experts, top-2 and 2 layers every expert is used by exactly one layer, so the
pooled statistics are exactly uniform and the pooled loss has zero gradient (tests/test_train_formulas.py).

Arms, one variable at a time from "none": pooled α = 0.01; pooled α = 0.02 (= layers × α, the same total weight
as the per-layer sum, so a difference is not the coefficient's); per-layer α = 0.01. Same initialisation and
batches per seed in every arm. Measures: per-layer load entropy (log 4 = 1.386 balanced, log 2 = 0.693 collapsed
on 2 experts), LM losses; paired tests across seeds (t-test on the per-seed differences; sign test).
"""

from __future__ import annotations

import math

from .runner import (Context, finish_plot, markdown_table, mean_sd, paired, pyplot, steps_for,
                     tail_mean, train_run)

NAME = "routing-layers"
DESCRIPTION = "layers collapsed onto different experts: Switch aux loss per layer vs pooled (transformers)"
ALPHA = 0.01
METHODS = {"none": {},
           "pooled 0.01": {"aux_loss_coef": ALPHA, "aux_loss": "pooled"},
           "pooled 0.02": {"aux_loss_coef": 2 * ALPHA, "aux_loss": "pooled"},
           "per-layer 0.01": {"aux_loss_coef": ALPHA, "aux_loss": "per_layer"}}
MODEL = {"num_experts": 4, "experts_per_token": 2}  # E = layers · k: the pooled view is exactly balanced
SEEDS = (0, 1, 2, 3, 4)
RUNS = len(METHODS) * len(SEEDS)
ESCAPED = math.log(2) + 0.1  # a layer whose final load entropy exceeds this uses more than its 2 start experts


def min_layer_entropy(row: dict) -> float:
    return min(row["load_entropy"])


def run(ctx: Context) -> str:
    ctx.start = "staggered"  # this experiment's start, whatever --start says
    steps = steps_for(ctx, len(METHODS) * len(ctx.seeds), probes=[{"moe": {}, "model": MODEL}])
    for seed in ctx.seeds:
        for label, moe in METHODS.items():
            train_run(ctx, label, seed, steps, moe, start="staggered", model=MODEL)
    by = {label: [r for r in ctx.runs if r["label"] == label] for label in METHODS}
    final = {label: [tail_mean([min_layer_entropy(m) for m in r["metrics"]]) for r in runs]
             for label, runs in by.items()}
    rows = []
    for label, runs in by.items():
        per_layer = [[tail_mean([m["load_entropy"][i] for m in r["metrics"]]) for r in runs] for i in range(2)]
        escaped = sum(all(tail_mean([m["load_entropy"][i] for m in r["metrics"]]) > ESCAPED for i in range(2))
                      for r in runs)
        loss = [tail_mean([m["loss"] for m in r["metrics"]]) for r in runs]
        held = [r["heldout_loss"] for r in runs]
        rows.append([label, mean_sd(per_layer[0]), mean_sd(per_layer[1]), f"{escaped} / {len(runs)}",
                     mean_sd(loss), mean_sd(held)])
    table = markdown_table(["method", "final load entropy, layer 0", "final load entropy, layer 1",
                            "seeds with both layers escaped", "final loss", "held-out loss"], rows)
    ref = "per-layer 0.01"
    tests = "\n".join(
        f"- {ref} − {other}: lowest layer's final entropy {paired(final[ref], final[other])}; held-out loss "
        f"{paired([r['heldout_loss'] for r in by[ref]], [r['heldout_loss'] for r in by[other]])}"
        for other in METHODS if other != ref)
    per_seed = markdown_table(
        ["method"] + [f"seed {r['seed']}: entropy L0 / L1" for r in by[ref]],
        [[label] + [f"{tail_mean([m['load_entropy'][0] for m in r['metrics']]):.3f} / "
                    f"{tail_mean([m['load_entropy'][1] for m in r['metrics']]):.3f}" for r in runs]
         for label, runs in by.items()])
    plot(ctx, by)
    return (f"Start: layer 0 → experts {{0, 1}}, layer 1 → {{2, 3}} (4 experts, top-2, 2 layers); {steps} steps; "
            f"mean ± sd over {len(ctx.seeds)} seeds; 'final' = mean of the last 10 steps; entropy in nats "
            f"(log 4 = {math.log(4):.3f} balanced, log 2 = {math.log(2):.3f} collapsed); 'escaped': final entropy "
            f"> log 2 + 0.1 in both layers.\n\n{table}\nPaired by seed:\n\n{tests}\n\nPer seed:\n\n{per_seed}\n"
            "![load entropy per layer](load_entropy.png)\n")


def plot(ctx: Context, by: dict[str, list[dict]]) -> None:
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, ax in enumerate(axes):
        for c, (label, runs) in enumerate(by.items()):
            ys = np.array([[m["load_entropy"][i] for m in r["metrics"]] for r in runs])
            x = np.arange(1, ys.shape[1] + 1)
            for y in ys:
                ax.plot(x, y, color=f"C{c}", alpha=0.25, lw=0.7)
            ax.plot(x, ys.mean(0), color=f"C{c}", lw=1.8, label=f"{label} (mean of {len(runs)})")
        ax.axhline(math.log(4), color="gray", ls="--", lw=0.8)
        ax.axhline(math.log(2), color="gray", ls=":", lw=0.8)
        ax.set_title(f"layer {i}")
        if i == 0:
            ax.set_ylabel("expert-load entropy (nats)")
        ax.set_xlabel("step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "load_entropy.png", dpi=80)
    plt.close(fig)
