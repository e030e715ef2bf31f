"""Training stability: pre-norm (GPT-oss) vs post-norm vs QK-norm vs post-norm + QK-norm at a learning rate high
enough to provoke gradient spikes.

Claim tested (OLMo-2, Team OLMo 2024, §3.2–3.3): normalising each sublayer's output instead of its input
("reordered norm", x + Norm(f(x))) and RMSNorm on queries and keys make training more stable; their 7B runs
went from a gradient-norm spike score of 0.108 to 0.069 with these changes (plus others in the same step).

Spike score (OLMo 2 §3.2, train/stability.py): the percentage of the values of the whole series that lie at least
7 standard deviations (either side) from the mean of the `window` values before them; logged by the trainer for
the gradient norm (before clipping) and the loss. OLMo-2's window is 1000 steps of runs ~10⁶ steps long; these
runs have ~10³, so the window is scaled to 100 steps (values with fewer predecessors are never spikes: the
warm-up transient, where post-norm starts with gradient norms ~100× their later level, is not judged).
"""

from __future__ import annotations

import statistics

from .runner import (BEST_LOSS, Context, finish_plot, markdown_table, mean_sd, pyplot, scipy_stats, steps_for,
                     tail_mean, train_run)

NAME = "stability"
DESCRIPTION = "pre-norm vs post-norm vs QK-norm vs post-norm + QK-norm at a spike-provoking learning rate"
VARIANTS = {"pre-norm": {},  # GPT-oss
            "post-norm": {"norm_placement": "post"},
            "QK-norm": {"qk_norm": "olmo2"},
            "post-norm + QK-norm": {"norm_placement": "post", "qk_norm": "olmo2"}}  # OLMo-2
LR = 0.1  # 33× the other experiments' 3e-3: pre-norm runs spike here (gradient norms 100× their median)
WINDOW = 100  # trailing window of the spike score (steps)
RUNS = len(VARIANTS) * 5  # the default seeds


def window_for(steps: int) -> int:
    return min(WINDOW, max(10, steps // 8))  # short smoke runs: a shorter window


def spike_steps(values: list[float], window: int) -> list[int]:
    """Indices of the values that OLMo-2's spike score counts (train/stability.py; the trainer's meter)."""
    from ..train.stability import spike_flags

    return [i for i, spike in enumerate(spike_flags(values, window)) if spike]


def run(ctx: Context) -> str:
    optim = {"lr": LR, "min_lr": LR / 10}
    steps = steps_for(ctx, len(VARIANTS) * len(ctx.seeds), probes=[{"optim": optim}])
    window = window_for(steps)
    train = {"spike_window": window}  # the trainer logs the score over the trailing window with the same meter
    for seed in ctx.seeds:
        for label, model in VARIANTS.items():
            train_run(ctx, label, seed, steps, model=model, optim=optim, train=train)
    by = {label: [r for r in ctx.runs if r["label"] == label] for label in VARIANTS}
    rows, counts, held = [], {}, {}
    for label, runs in by.items():
        count = [len(spikes_after(r, "grad_norm", window)) for r in runs]
        counts[label] = count
        counted = max(1, steps)  # OLMo-2: a share of the whole series
        grad = [100 * c / counted for c in count]
        loss_spk = [100 * len(spikes_after(r, "loss", window)) / counted for r in runs]
        peak = [max(m["grad_norm"] for m in r["metrics"][window:] or r["metrics"]) for r in runs]
        median = [statistics.median(m["grad_norm"] for m in r["metrics"]) for r in runs]
        loss = [tail_mean([m["loss"] for m in r["metrics"]]) for r in runs]
        held[label] = [r["heldout_loss"] for r in runs]
        rows.append([label, mean_sd(grad), " / ".join(map(str, count)), mean_sd(loss_spk),
                     mean_sd(peak), mean_sd(median), mean_sd(loss), mean_sd(held[label]), collapses(runs)])
    table = markdown_table(["variant", "grad-norm spike score %", "grad spikes per seed", "loss spike score %",
                            "peak grad norm (after the first window)", "median grad norm", "final loss",
                            "held-out loss", "collapsed layers (seed: layer)"], rows)
    tests = "\n".join(f"- {label} vs pre-norm: {comparison(counts['pre-norm'], counts[label], held['pre-norm'], held[label])}"
                      for label in VARIANTS if label != "pre-norm")
    plot(ctx, by, window)
    return (f"Learning rate {LR} → {LR / 10} (cosine, warmup 5 %), grad clip 1.0, mean ± sd over {len(ctx.seeds)} "
            f"seeds. Spike score: % of all {steps} steps whose value lies ≥ 7 sd (either side) from the mean of the "
            f"{window} steps before it (OLMo-2's definition, window scaled); 'final loss' = mean "
            "of the last 10 steps. 'Collapsed layers': a layer whose expert load over the last 10 steps has entropy "
            "< log 2 + 0.1 (≤ about 2 of 8 experts in use).\n\n"
            f"{table}\nTests against pre-norm (spikes: total counts over the seeds, exact conditional binomial test "
            "of two Poisson counts with equal exposure, two-sided; held-out loss: paired t-test by seed):\n\n"
            f"{tests}\n\n![loss](loss.png)\n\n![gradient norm](grad_norm.png)\n")


def comparison(base: list[int], other: list[int], base_held: list[float], other_held: list[float]) -> str:
    stats = scipy_stats()

    a, b = sum(base), sum(other)
    p_spikes = stats.binomtest(b, a + b, 0.5).pvalue if a + b else 1.0
    d = [y - x for x, y in zip(base_held, other_held)]
    p_held = stats.ttest_rel(other_held, base_held).pvalue if len(d) > 1 and statistics.pstdev(d) > 0 else float("nan")
    return (f"grad-norm spikes {b} vs {a} (p = {p_spikes:.2g}); held-out loss {statistics.mean(d):+.3f} ± "
            f"{statistics.stdev(d) if len(d) > 1 else 0:.3f} (p = {p_held:.2g})")


def collapses(runs: list[dict]) -> str:
    """Every run whose routing collapsed in some layer (an unexpected event to report, not to average away)."""
    import math

    out = []
    for r in runs:
        for i in range(len(r["metrics"][0]["load_entropy"])):
            if tail_mean([m["load_entropy"][i] for m in r["metrics"]]) < math.log(2) + 0.1:
                out.append(f"{r['seed']}: {i}")
    return ", ".join(out) or "none"


def spikes_after(run: dict, key: str, window: int) -> list[int]:
    """Spike steps (only values with a full window before them can be spikes)."""
    return spike_steps([m[key] for m in run["metrics"]], window)


def plot(ctx: Context, by: dict[str, list[dict]], window: int) -> None:
    import numpy as np

    plt = pyplot()
    for key, fname, ylabel in (("loss", "loss.png", "training loss (nats)"),
                               ("grad_norm", "grad_norm.png", "gradient norm before clipping")):
        fig, axes = plt.subplots(len(by), 1, figsize=(8, 1.9 * len(by)), sharex=True, sharey=True, squeeze=False)
        for c, (ax, (label, runs)) in enumerate(zip(axes[:, 0], by.items())):
            for s, r in enumerate(runs):
                y = np.array([m[key] for m in r["metrics"]])
                x = np.arange(1, len(y) + 1)
                ax.plot(x, y, color=f"C{c}", alpha=max(0.3, 1.0 - 0.15 * s), lw=0.7, label=f"{label}, seed {r['seed']}")
                spike = spikes_after(r, key, window)
                ax.plot(x[spike], y[spike], "kx", ms=5, label="spike (> 7 sd)" if s == 0 and spike else None)
            ax.axvline(window, color="gray", ls=":", lw=0.8)
            if key == "loss":
                ax.axhline(BEST_LOSS, color="gray", ls="--", lw=0.8)
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper right")
            ax.set_ylabel(ylabel if c == len(by) // 2 else "")
        finish_plot(plt, fig, axes[-1, 0], ctx.out / fname, "")
