"""The GPT-2 → GPT-oss ladder: start from GPT-2's architecture and add GPT-oss's changes one at a time.

Rungs (each keeps every change above it): GPT-2 (LayerNorm, learned absolute positions, dense GELU FFN,
multi-head attention, every layer global, no sinks, dropout 0.1) → no dropout → RoPE → SwiGLU → MoE (8 experts,
top-2) → GQA (2 kv heads for 4 query heads) → alternating sliding window + attention sinks → RMSNorm = GPT-oss.
Claim tested: each step helps (or at least does not hurt) — the premise of the GPT-oss model card's
"standard" architecture list, each change with its own paper (RoPE: Su et al. 2021; SwiGLU: Shazeer 2020;
MoE: Shazeer et al. 2017; GQA: Ainslie et al. 2023; window + sinks: Beltagy et al. 2020, Xiao et al. 2023;
RMSNorm: Zhang & Sennrich 2019).

Budget held equal: the same steps, tokens and batches (per seed) for every rung, and the same FFN weights per
token: GELU width 3·F (2 matrices), SwiGLU width 2·F (3 matrices), MoE experts of width F, top-2 — each
3·D·2F weights per token, with F the experts' width (64). Total parameters still differ (the MoE holds 4×
the FFN weights, GQA drops kv projections, learned positions add a table): the table lists them.
Task: contextual Markov (runner.contextual_markov), whose tokens do not reveal their cluster, so the model must
use the document's history; the Bayes-optimal held-out loss is shown for scale.
"""

from __future__ import annotations

import re
import statistics

from ..config import FULL, SLIDING
from .runner import (Context, contextual_markov, finish_plot, markdown_table, markov_optimum, mean_sd,
                     model_shape, paired, position_losses, pyplot, spread, steps_for, tail_mean, train_run)

NAME = "ladder"
DESCRIPTION = "GPT-2 → GPT-oss one change at a time (no dropout, RoPE, SwiGLU, MoE, GQA, window + sinks, RMSNorm)"
SEQ_LEN = 64
N_DOCS, N_HELDOUT = 8000, 200  # training documents of SEQ_LEN tokens (≈ one epoch at 1000 steps of 8)
RUNGS = ["GPT-2", "− dropout", "+ RoPE", "+ SwiGLU", "+ MoE", "+ GQA", "+ window + sinks", "+ RMSNorm = GPT-oss"]
RUNS = len(RUNGS) * 5  # the default seeds


def rung_models(size: str = "default") -> dict[str, dict]:
    """[model] overrides of every rung, cumulative; F = the experts' width, k = 2 experts per token."""
    from ..train import TrainConfig

    shape = TrainConfig.from_dict({"model": model_shape(size)}).model_config()
    F, k = shape.intermediate_size, shape.experts_per_token
    H, kv = shape.num_attention_heads, shape.num_key_value_heads
    steps = [
        {"dropout": 0.1, "norm_type": "layer", "position_embedding": "learned", "mlp_type": "gelu",
         "intermediate_size": 3 * F * k // 2, "num_key_value_heads": H, "layer_types": [FULL, FULL],
         "attention_sinks": False, "max_position_embeddings": SEQ_LEN},
        {"dropout": 0.0},
        {"position_embedding": "rope"},
        {"mlp_type": "swiglu", "intermediate_size": F * k},
        {"mlp_type": "moe", "intermediate_size": F},
        {"num_key_value_heads": kv},
        {"layer_types": [SLIDING, FULL], "attention_sinks": True},
        {"norm_type": "rms"},
    ]
    models, current = {}, {}
    for label, change in zip(RUNGS, steps):
        current = {**current, **change}
        models[label] = dict(current)
    return models


def documents() -> list:
    return list(contextual_markov(N_DOCS + N_HELDOUT, SEQ_LEN)[:N_DOCS])


def evaluate(model, seq_len: int) -> dict:
    """Held-out loss over N_HELDOUT unseen documents, and the model's parameter counts (total; active per token:
    the MoE's unchosen experts left out)."""
    losses = position_losses(model, contextual_markov(N_DOCS + N_HELDOUT, SEQ_LEN)[N_DOCS:], seq_len)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.mlp\.mlp[12]_(weight|bias)", n))
    c = model.config
    active = total - experts * (c.num_experts - c.experts_per_token) // c.num_experts if c.mlp_type == "moe" else total
    return {"loss": statistics.mean(losses), "params": total, "active_params": active}


def run(ctx: Context) -> str:
    models = rung_models(ctx.size)
    data = {"seq_len": SEQ_LEN}
    # The step time differs by rung (dense vs MoE FFN): probe the first and the last, plan with their mean.
    probes = [{"model": models[r], "data": data, "documents": documents} for r in (RUNGS[0], RUNGS[-1])]
    steps = steps_for(ctx, len(RUNGS) * len(ctx.seeds), probes=probes)
    for seed in ctx.seeds:
        for label in RUNGS:
            train_run(ctx, label, seed, steps, model=models[label], data=data, documents=documents,
                      evaluate=evaluate)
    by = {label: [r for r in ctx.runs if r["label"] == label] for label in RUNGS}
    optimum = markov_optimum(contextual_markov(N_DOCS + N_HELDOUT, SEQ_LEN)[N_DOCS:])
    rows, previous = [], None
    for label, runs in by.items():
        held = [r["heldout_loss"] for r in runs]
        delta = "" if previous is None else paired(held, previous)
        loss = [tail_mean([m["loss"] for m in r["metrics"]]) for r in runs]
        ms = [1e3 * statistics.median(m["time_s"] for m in r["metrics"][1:]) for r in runs]
        e = runs[0]["eval"]
        rows.append([label, f"{e['params']:,}", f"{e['active_params']:,}", mean_sd(held), delta, mean_sd(loss),
                     spread(ms, ".1f"), spread([r["wall_s"] for r in runs])])
        previous = held
    table = markdown_table(["rung (cumulative)", "params", "active params / token", "held-out loss",
                            "Δ held-out vs rung above (paired by seed)", "final training loss",
                            "ms / step (median of runs, min–max)", "wall s / run (min–max)"], rows)
    plot(ctx, by, statistics.mean(optimum))
    return (f"Mean ± sd over {len(ctx.seeds)} seeds. Held-out loss: {N_HELDOUT} unseen documents, fp32, dropout "
            f"off; Bayes-optimal held-out loss {statistics.mean(optimum):.3f}. Training loss = mean of the last 10 "
            "steps, with dropout on where the rung has it. Same steps, batches and FFN weights per token for "
            "every rung; ms/step is wall-clock on a shared CPU.\n\n"
            f"{table}\n![loss vs step](loss_vs_step.png)\n\n![loss vs wall-clock](loss_vs_time.png)\n\n"
            "![held-out loss by rung](heldout.png)\n")


def smooth(y, n: int = 20):
    """Trailing mean over n steps (per-step losses of 512 tokens are noisy)."""
    import numpy as np

    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - n)
    return (c[i] - c[lo]) / (i - lo)


def plot(ctx: Context, by: dict[str, list[dict]], optimum: float) -> None:
    import numpy as np

    plt = pyplot()
    colors = plt.cm.viridis(np.linspace(0, 0.95, len(by)))
    for fname, x_of, xlabel in (("loss_vs_step.png", None, "step"),
                                ("loss_vs_time.png", "time_s", "wall-clock seconds (mean over seeds)")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for color, (label, runs) in zip(colors, by.items()):
            y = smooth(np.mean([[m["loss"] for m in r["metrics"]] for r in runs], axis=0))
            x = np.arange(1, len(y) + 1) if x_of is None else \
                np.mean([np.cumsum([m[x_of] for m in r["metrics"]]) for r in runs], axis=0)
            ax.plot(x, y, color=color, lw=1.4, label=label)
        ax.axhline(optimum, color="gray", ls="--", lw=0.8, label="Bayes-optimal (held-out)")
        ax.set_yscale("log")
        finish_plot(plt, fig, ax, ctx.out / fname, "training loss, 20-step mean, mean of seeds (nats)", xlabel)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (label, runs) in enumerate(by.items()):
        held = [r["heldout_loss"] for r in runs]
        ax.plot([i] * len(held), held, "o", color=colors[i], alpha=0.6)
        ax.errorbar([i], [statistics.mean(held)], yerr=[statistics.stdev(held)] if len(held) > 1 else None,
                    fmt="s", color="k", ms=4)
    ax.axhline(optimum, color="gray", ls="--", lw=0.8, label="Bayes-optimal")
    ax.set_xticks(range(len(by)), list(by), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "heldout.png", dpi=80)
    plt.close(fig)
