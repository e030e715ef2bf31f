"""Router collapse: no balancing vs the Switch load-balancing loss vs DeepSeek-V3's auxiliary-loss-free bias.

Claims tested: without balancing, top-k routers collapse onto a few experts (Shazeer et al. 2017; Fedus et al.
2021, Switch Transformer, §2.2); an auxiliary loss (coef 0.01) keeps the load balanced; DeepSeek-V3 (2024,
§2.1.2) balances as well without the auxiliary loss's interference with the LM gradient, i.e. at equal or
lower loss. Every method starts from the same initialisation and sees the same data for a given seed.
"""

from __future__ import annotations

import math

from .runner import Context, finish_plot, markdown_table, mean_sd, paired, pyplot, steps_for, tail_mean, train_run

NAME = "routing"
DESCRIPTION = "router collapse: none vs Switch aux loss vs DeepSeek-V3 aux-free bias (same init)"
METHODS = {"none": {}, "aux 0.01": {"aux_loss_coef": 0.01}, "bias 1e-3": {"bias_update_rate": 1e-3}}
COMPARISONS = (("aux 0.01", "none"), ("bias 1e-3", "none"), ("bias 1e-3", "aux 0.01"))
RUNS = len(METHODS) * 5


def layer_mean_entropy(row: dict) -> float:
    return sum(row["load_entropy"]) / len(row["load_entropy"])


def run(ctx: Context) -> str:
    steps = steps_for(ctx, len(METHODS) * len(ctx.seeds))
    for seed in ctx.seeds:
        for label, moe in METHODS.items():
            train_run(ctx, label, seed, steps, moe)
    by = {label: [r for r in ctx.runs if r["label"] == label] for label in METHODS}
    E = len(ctx.runs[0]["metrics"][0]["expert_load"][0])
    rows = []
    for label, runs in by.items():
        loss = [tail_mean([m["loss"] for m in r["metrics"]]) for r in runs]
        held = [r["heldout_loss"] for r in runs]
        ent = [tail_mean([layer_mean_entropy(m) for m in r["metrics"]]) for r in runs]
        min_ent = [min(layer_mean_entropy(m) for m in r["metrics"]) for r in runs]
        peak = [tail_mean([max(m["load_max_over_mean"]) for m in r["metrics"]]) for r in runs]
        rows.append([label, mean_sd(loss), mean_sd(held), mean_sd(ent), mean_sd(min_ent), mean_sd(peak)])
    table = markdown_table(
        ["method", "final loss", "held-out loss", f"final load entropy (max {math.log(E):.3f})",
         "lowest entropy in the run", "final max/mean load (worst layer)"], rows)
    per_seed = markdown_table(
        ["method"] + [f"seed {s}: loss / entropy" for s in ctx.seeds],
        [[label] + [f"{tail_mean([m['loss'] for m in r['metrics']]):.4f} / "
                    f"{tail_mean([layer_mean_entropy(m) for m in r['metrics']]):.3f}" for r in runs]
         for label, runs in by.items()])
    final = {label: [tail_mean([layer_mean_entropy(m) for m in r["metrics"]]) for r in runs]
             for label, runs in by.items()}
    held = {label: [r["heldout_loss"] for r in runs] for label, runs in by.items()}
    tests = "\n".join(f"- {a} − {b}: final load entropy {paired(final[a], final[b])}; held-out loss "
                      f"{paired(held[a], held[b], '+.4f')}" for a, b in COMPARISONS)
    plot(ctx, by)
    return (f"Mean ± sd over {len(ctx.seeds)} seeds; 'final' = mean of the last 10 steps; entropy = layer mean of "
            f"the per-step expert-load entropy (nats).\n\n{table}\nPaired by seed (same init and batches):\n\n"
            f"{tests}\n\nPer seed:\n\n{per_seed}\n"
            "![load heatmap](load_heatmap.png)\n\n![load entropy](load_entropy.png)\n\n![loss](loss.png)\n")


def plot(ctx: Context, by: dict[str, list[dict]]) -> None:
    import numpy as np

    plt = pyplot()
    layers = len(ctx.runs[0]["metrics"][0]["expert_load"])
    fig, axes = plt.subplots(layers, len(by), figsize=(4 * len(by), 2.2 * layers), squeeze=False,
                             sharex=True, sharey=True)
    for j, (label, runs) in enumerate(by.items()):
        r = runs[0]  # the first seed
        for i in range(layers):
            load = np.array([m["expert_load"][i] for m in r["metrics"]]).T  # (E, steps)
            im = axes[i, j].imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=0.5, interpolation="nearest")
            axes[i, j].set_title(f"{label}, layer {i} (seed {r['seed']})", fontsize=9)
            axes[i, j].set_ylabel("expert")
        axes[-1, j].set_xlabel("step")
    fig.colorbar(im, ax=axes, label="fraction of assignments", shrink=0.8)
    fig.savefig(ctx.out / "load_heatmap.png", dpi=80)
    plt.close(fig)

    for key, fname, ylabel in (("entropy", "load_entropy.png", "load entropy, layer mean (nats)"),
                               ("loss", "loss.png", "training loss (nats)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for c, (label, runs) in enumerate(by.items()):
            ys = np.array([[layer_mean_entropy(m) if key == "entropy" else m["loss"] for m in r["metrics"]]
                           for r in runs])
            x = np.arange(1, ys.shape[1] + 1)
            for y in ys:
                ax.plot(x, y, color=f"C{c}", alpha=0.25, lw=0.7)
            ax.plot(x, ys.mean(0), color=f"C{c}", lw=1.8, label=f"{label} (mean of {len(runs)} seeds)")
        if key == "entropy":
            E = len(ctx.runs[0]["metrics"][0]["expert_load"][0])
            ax.axhline(math.log(E), color="gray", ls="--", lw=0.8, label=f"log {E} (balanced)")
        else:
            from .runner import BEST_LOSS

            ax.axhline(BEST_LOSS, color="gray", ls="--", lw=0.8, label="task optimum (log 2)")
            ax.set_yscale("log")
        finish_plot(plt, fig, ax, ctx.out / fname, ylabel)
