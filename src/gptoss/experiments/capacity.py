"""Capacity factor: expert capacity ⌈tokens·k/E · factor⌉ per micro-batch, overflow assignments dropped (the
token keeps its residual and its other choice). Claims tested (Switch Transformer, Fedus et al. 2021, §2.2 and
Table 1): a factor of 1.0–1.25 drops few tokens once routing is balanced, and larger factors buy little loss for
their extra compute and memory. Here all runs use the Switch aux loss (coef 0.01, Switch's setting)."""

from __future__ import annotations

import math
import statistics

from .runner import (Context, finish_plot, markdown_table, mean_sd, paired, pyplot, spread, steps_for, tail_mean,
                     train_run)

NAME = "capacity"
DESCRIPTION = "capacity factor 1.0 / 1.25 / 2.0 / ∞: dropped-token %, loss, tokens/s"
FACTORS = {"1.0": 1.0, "1.25": 1.25, "2.0": 2.0, "∞": 0.0}  # 0: no capacity limit
AUX = 0.01
RUNS = len(FACTORS) * 5  # the default seeds


def layer_mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def run(ctx: Context) -> str:
    steps = steps_for(ctx, len(FACTORS) * len(ctx.seeds))
    for seed in ctx.seeds:
        for label, factor in FACTORS.items():
            train_run(ctx, f"cf {label}", seed, steps, {"capacity_factor": factor, "aux_loss_coef": AUX})
    by = {label: [r for r in ctx.runs if r["label"] == f"cf {label}"] for label in FACTORS}
    # per run: the median tokens/s over its steps after the first (one-off allocation, thread start-up)
    tps = {label: [statistics.median(m["tokens_per_s"] for m in r["metrics"][1:]) for r in runs]
           for label, runs in by.items()}
    held = {label: [r["heldout_loss"] for r in runs] for label, runs in by.items()}
    rows = []
    for label, runs in by.items():
        drop_all = [statistics.mean(layer_mean(m["dropped_pct"]) for m in r["metrics"]) for r in runs]
        drop_end = [tail_mean([layer_mean(m["dropped_pct"]) for m in r["metrics"]]) for r in runs]
        loss = [tail_mean([m["loss"] for m in r["metrics"]]) for r in runs]
        ratio = [a / b for a, b in zip(tps[label], tps["∞"])]
        rows.append([label, mean_sd(drop_all), mean_sd(drop_end), mean_sd(loss), mean_sd(held[label]),
                     spread(tps[label]), spread(ratio, ".3f")])
    table = markdown_table(["capacity factor", "dropped % (whole run)", "dropped % (last 10 steps)",
                            "final loss", "held-out loss", "tokens/s, median of runs (min–max)",
                            "tokens/s ÷ same seed's ∞ (min–max)"], rows)
    tests = "\n".join(
        f"- {label} − ∞: held-out loss {paired(held[label], held['∞'], '+.4f')}; log tokens/s "
        f"{paired([math.log(x) for x in tps[label]], [math.log(x) for x in tps['∞']])}"
        for label in FACTORS if label != "∞")
    plot(ctx, by)
    return (f"Mean ± sd over {len(ctx.seeds)} seeds; dropped % = assignments dropped / assignments, layer mean; "
            "'final'/'last 10' = mean of the last 10 steps. tokens/s: each run's median step after the first, "
            "wall-clock on a shared 2-core CPU; the runs of one seed ran one after another, so the ratio to the "
            "same seed's ∞ run is the paired comparison.\n\n"
            f"{table}\nPaired by seed (same init and batches):\n\n{tests}\n\n"
            "![dropped](dropped.png)\n\n![loss](loss.png)\n")


def plot(ctx: Context, by: dict[str, list[dict]]) -> None:
    import numpy as np

    plt = pyplot()
    for key, fname, ylabel in (("drop", "dropped.png", "dropped assignments, layer mean (%)"),
                               ("loss", "loss.png", "training loss (nats)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for c, (label, runs) in enumerate(by.items()):
            ys = np.array([[layer_mean(m["dropped_pct"]) if key == "drop" else m["loss"] for m in r["metrics"]]
                           for r in runs])
            x = np.arange(1, ys.shape[1] + 1)
            ax.plot(x, ys.mean(0), color=f"C{c}", lw=1.5, label=f"capacity {label} (mean of {len(runs)} seeds)")
        if key == "loss":
            ax.set_yscale("log")
        finish_plot(plt, fig, ax, ctx.out / fname, ylabel)
