"""Sliding window + sinks vs full attention: what GPT-oss's 128-token window on every other layer, and its
attention sinks, do to the training loss and to the decode cost as the context grows.

Claims tested: interleaving banded (sliding-window) and dense layers, as GPT-3 and GPT-oss do, loses little
quality (Beltagy et al. 2020, Longformer; Child et al. 2019) while the windowed layers' decode cost and KV cache
stay constant in the context length; sinks let a head put its attention nowhere (Xiao et al. 2023,
StreamingLLM; GPT-oss model card).

Loss: sequences of 256 tokens, window 128 (GPT-oss's), on the far-copy task (runner.far_copy): 130 random
tokens, then the same again, so each token of the second pass sits 130 positions after its source — just
beyond the window: the induction circuit's copying head must sit in a global layer (the "all window" control
has none; two stacked windows do reach 254 back, but only through a relay). The first pass is
unpredictable for every model (log 96 nats); the second is 0 nats for a model that copies. The FFN is dense
SwiGLU of width 2·64 (the MoE's top-2 × 64 per token): the question is about attention, and the MoE would cost
~4× the step time on CPU, i.e. ~4× fewer steps in the budget. Decode: ms per token at growing contexts, batch
1, one thread, a randomly initialised model of the `small` preset's shape (6 layers, hidden 256, 8 query / 2 kv
heads of 32, 8 experts top-2) with window 128, the cache pre-filled with random keys and values (a long prefill
would dominate the time and tells nothing about decoding); GPT-oss-20b's KV-cache sizes are computed from its
config.
"""

from __future__ import annotations

import math
import statistics
import time

from ..config import FULL, SLIDING
from .runner import (COPY_IDS, Context, far_copy, finish_plot, fisher, markdown_table, mean_sd, paired, pyplot,
                     position_losses, spread, steps_for, tail_mean, train_run)

NAME = "sliding-window"
DESCRIPTION = "window 128 + sinks on alternate layers vs all-full attention: loss on a far copy, decode cost"
# The 2 × 2 of window × sinks, so that each changes alone (issue 22). The all-window control of the issue-9 run
# (experiments/RESULTS.md §5, 0/3 seeds learned the copy) is not rerun: it is a check of the task, not a claim.
VARIANTS = {"GPT-oss: window + sinks": {},  # alternating, sliding first
            "window, no sinks": {"attention_sinks": False},
            "all full + sinks": {"layer_types": [FULL, FULL]},
            "all full, no sinks": {"layer_types": [FULL, FULL], "attention_sinks": False}}
# (a, b, what changes from b to a): one variable at a time
COMPARISONS = (("GPT-oss: window + sinks", "all full + sinks", "window, with sinks"),
               ("window, no sinks", "all full, no sinks", "window, without sinks"),
               ("GPT-oss: window + sinks", "window, no sinks", "sinks, with window"),
               ("all full + sinks", "all full, no sinks", "sinks, without window"))
RUNS = len(VARIANTS) * 5  # the default seeds
# size → sequence length, window, copy distance, decode contexts, decode steps
SIZES = {"default": {"seq_len": 256, "window": 128, "span": 130, "contexts": [128, 1024, 4096, 16384], "steps": 16},
         "test": {"seq_len": 64, "window": 16, "span": 20, "contexts": [16, 64], "steps": 3}}
N_DOCS, N_HELDOUT = 3000, 100


def task(ctx: Context) -> tuple:
    s = SIZES[ctx.size]
    return far_copy(N_DOCS + N_HELDOUT, s["seq_len"], s["span"])


def parts(ctx: Context) -> dict[str, list[int]]:
    """Target positions (p predicts token p + 1) of the first pass (random) and of the copy (from the position
    whose token has an earlier occurrence, span, on)."""
    s = SIZES[ctx.size]
    return {"first pass": list(range(s["span"] - 1)), "copy": list(range(s["span"], s["seq_len"] - 1))}


def run(ctx: Context) -> str:
    s = SIZES[ctx.size]
    F = 32 if ctx.size == "test" else 64  # the experts' width in runner.model_shape
    model = {"sliding_window": s["window"], "mlp_type": "swiglu", "intermediate_size": 2 * F}
    data = {"seq_len": s["seq_len"]}
    docs = task(ctx)

    def documents() -> list:
        return list(docs[:N_DOCS])

    def evaluate(m, seq_len: int) -> dict:
        losses = position_losses(m, docs[N_DOCS:], seq_len)
        return {"loss": statistics.mean(losses), "by_position": losses}

    reserve = 60.0 if ctx.size == "default" else 0.0  # the decode timing after training
    steps = steps_for(ctx, len(VARIANTS) * len(ctx.seeds), reserve_s=reserve,
                      probes=[{"model": model, "data": data, "documents": documents}])
    for seed in ctx.seeds:
        for label, change in VARIANTS.items():
            train_run(ctx, label, seed, steps, model={**model, **change}, data=data, documents=documents,
                      evaluate=evaluate)
    by = {label: [r for r in ctx.runs if r["label"] == label] for label in VARIANTS}
    where = parts(ctx)
    blind = math.log(len(COPY_IDS))
    # a run has "learned the copy" once its 20-step mean training loss is halfway from blind (every target
    # log 96) to perfect copying (only the span unpredictable targets of the L - 1 left)
    halfway = blind * (1 + s["span"] / (s["seq_len"] - 1)) / 2
    rows, copy, learned = [], {}, {}
    for label, runs in by.items():
        part = {k: [statistics.mean(r["eval"]["by_position"][p] for p in ps) for r in runs] for k, ps in where.items()}
        copy[label] = part["copy"]
        learned[label] = [learned_at(r, halfway) for r in runs]
        rows.append([label, mean_sd([r["heldout_loss"] for r in runs]), mean_sd(part["first pass"]),
                     mean_sd(part["copy"]), " / ".join("–" if x is None else str(x) for x in learned[label]),
                     mean_sd([tail_mean([m["loss"] for m in r["metrics"]]) for r in runs]),
                     spread([1e3 * statistics.median(m["time_s"] for m in r["metrics"][1:]) for r in runs])])
    table = markdown_table(["variant", "held-out loss (all)", f"first pass (blind {blind:.3f})",
                            f"copy (optimum 0, blind {blind:.3f})", "copy learned at step (per seed; – never)",
                            "final training loss", "ms / step (median of runs, min–max)"], rows)
    n = len(ctx.seeds)
    tests = "\n".join(
        f"- {what} ({a} vs {b}): learned the copy in {sum(x is not None for x in learned[a])}/{n} vs "
        f"{sum(x is not None for x in learned[b])}/{n} seeds (Fisher's exact test p = "
        f"{fisher(sum(x is not None for x in learned[a]), n, sum(x is not None for x in learned[b]), n):.2g}); "
        f"held-out copy loss {paired(copy[a], copy[b])}" for a, b, what in COMPARISONS)
    ctx.log("decode timing ...")
    decode = decode_costs(ctx)
    dtable = markdown_table(
        ["context", "ms / token, window + full (min–max)", "ms / token, all full (min–max)", "ratio of medians",
         "KV cache MiB, window + full", "KV cache MiB, all full"],
        [[c, f"{decode['alternating'][i]:.2f} ({decode['alternating_range'][i]})",
          f"{decode['full'][i]:.2f} ({decode['full_range'][i]})",
          f"{decode['full'][i] / decode['alternating'][i]:.2f}", f"{kv_mib(ctx, c, True):.2f}",
          f"{kv_mib(ctx, c, False):.2f}"] for i, c in enumerate(s["contexts"])])
    big = markdown_table(["context", "GPT-oss-20b KV cache GiB (alternating, as shipped)", "all full"],
                         [[c, f"{kv_20b(c, True):.2f}", f"{kv_20b(c, False):.2f}"] for c in (4096, 32768, 131072)])
    plot(ctx, by, where, decode)
    dc = decode_config(ctx, full=False)
    return (f"Sequences of {s['seq_len']} tokens, window {s['window']}, copy distance {s['span']}; mean ± sd over "
            f"{len(ctx.seeds)} seeds; held-out = {N_HELDOUT} unseen documents, fp32; final training loss = mean of "
            f"the last 10 steps; 'copy learned at step': the first step whose 20-step mean training loss is below "
            f"{halfway:.2f}, halfway from blind to perfect copying.\n\n{table}\nOne variable at a time, paired by "
            f"seed (same init and batches):\n\n{tests}\n\n"
            f"Decode (median of {s['steps'] - 1} steps after a warm-up step, batch 1, one thread; random weights, "
            f"{dc.num_hidden_layers} layers, hidden {dc.hidden_size}, {dc.num_attention_heads} query / "
            f"{dc.num_key_value_heads} kv heads of {dc.head_dim}, {dc.num_experts} experts top-"
            f"{dc.experts_per_token}, window {s['window']}; fp32 cache as on CPU):\n\n{dtable}\n"
            f"KV cache of GPT-oss-20b at batch 1, bf16 (24 layers, 8 kv heads of 64; computed, not measured):\n\n"
            f"{big}\n![loss by position](loss_by_position.png)\n\n![training loss](loss.png)\n\n"
            "![decode cost](decode.png)\n")


def learned_at(run: dict, threshold: float) -> int | None:
    from .ladder import smooth

    below = [i + 1 for i, v in enumerate(smooth([m["loss"] for m in run["metrics"]])) if v < threshold]
    return below[0] if below else None


# ---------------------------------------------------------------- decode cost
def decode_config(ctx: Context, full: bool):
    from ..config import preset

    s = SIZES[ctx.size]
    if ctx.size == "test":
        c = preset("tiny").replace(num_hidden_layers=2, layer_types=(), sliding_window=s["window"])
    else:
        c = preset("small").replace(vocab_size=4096, sliding_window=s["window"])
    c = c.replace(max_position_embeddings=max(s["contexts"]) + 64)
    return c.replace(layer_types=(FULL,) * c.num_hidden_layers) if full else c


def kv_mib(ctx: Context, context: int, alternating: bool) -> float:
    """KV cache of the decode model at `context` tokens, fp32 (what the CPU cache holds)."""
    c = decode_config(ctx, not alternating)
    per_token = 2 * c.num_key_value_heads * c.head_dim * 4  # keys and values, fp32
    return sum(min(context, c.sliding_window) if c.is_sliding(i) else context
               for i in range(c.num_hidden_layers)) * per_token / 2**20


def kv_20b(context: int, alternating: bool) -> float:
    from ..config import preset

    c = preset("gpt-oss-20b")
    slots = sum(min(context, c.sliding_window) if alternating and c.is_sliding(i) else context
                for i in range(c.num_hidden_layers))
    return slots * 2 * c.num_key_value_heads * c.head_dim * 2 / 2**30  # bf16


def filled_cache(model, context: int):
    """A KVCache holding `context` positions of random keys and values (as after a prefill that long)."""
    import torch

    from ..cache import KVCache, default_cache_dtype

    c = model.config
    cache = KVCache(c, 1, max_len=context + 64, dtype=default_cache_dtype(model.dtype, "cpu"))
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(cache.layers):
        n = min(context, c.sliding_window) if c.is_sliding(i) else context
        k = torch.randn(1, n, c.num_key_value_heads, c.head_dim, generator=g)
        layer.update(k, torch.randn(k.shape, generator=g), torch.arange(context - n, context)[None])
        layer.length = context  # the ring's write index continues after the whole context
    return cache


def decode_costs(ctx: Context) -> dict[str, list[float]]:
    """Median ms per decoded token at each context, alternating vs all-full, measured context by context
    (both models at one context, then the next) so that a shared machine's load hits both alike."""
    import torch

    from ..model import Transformer

    s = SIZES[ctx.size]
    models = {}
    for name, full in (("alternating", False), ("full", True)):
        torch.manual_seed(0)
        models[name] = Transformer(decode_config(ctx, full), dtype=torch.bfloat16).eval()
    out: dict[str, list] = {key: [] for name in models for key in (name, name + "_range")}
    with torch.inference_mode():
        for context in s["contexts"]:
            for name, model in models.items():
                cache = filled_cache(model, context)
                token, times = torch.tensor([[1]]), []
                for step in range(s["steps"]):
                    t0 = time.perf_counter()
                    logits = model(token, torch.tensor([[context + step]]), cache)
                    token = logits[:, -1].argmax(-1, keepdim=True)
                    times.append(time.perf_counter() - t0)
                ms = [1e3 * t for t in times[1:]]  # the first step builds kernels, warms caches
                out[name].append(statistics.median(ms))
                out[name + "_range"].append(f"{min(ms):.2f}–{max(ms):.2f}")
            ctx.log(f"context {context}: {out['alternating'][-1]:.2f} ms/token (window + full), "
                    f"{out['full'][-1]:.2f} (all full)")
    return out


# ---------------------------------------------------------------- plots
def plot(ctx: Context, by: dict[str, list[dict]], where: dict[str, list[int]], decode: dict) -> None:
    import numpy as np

    from .ladder import smooth

    s = SIZES[ctx.size]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, (label, runs) in enumerate(by.items()):
        y = np.mean([r["eval"]["by_position"] for r in runs], axis=0)
        ax.plot(np.arange(len(y)), y, color=f"C{c}", lw=1.0, label=label)
    ax.axvspan(where["copy"][0], where["copy"][-1], color="gray", alpha=0.15, label=f"copy (source {s['span']} back)")
    ax.axvline(s["window"], color="k", ls=":", lw=0.8, label=f"window ({s['window']})")
    finish_plot(plt, fig, ax, ctx.out / "loss_by_position.png", "held-out loss, mean of seeds (nats)",
                "position in the document")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, (label, runs) in enumerate(by.items()):
        y = smooth(np.mean([[m["loss"] for m in r["metrics"]] for r in runs], axis=0))
        ax.plot(np.arange(1, len(y) + 1), y, color=f"C{c}", lw=1.2, label=label)
    ax.set_yscale("log")
    finish_plot(plt, fig, ax, ctx.out / "loss.png", "training loss, 20-step mean, mean of seeds (nats)")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("alternating", f"window {s['window']} + full, alternating (GPT-oss)"),
                        ("full", "all full")):
        ax.plot(s["contexts"], decode[name], "o-", label=label)
    ax.set_xscale("log")
    finish_plot(plt, fig, ax, ctx.out / "decode.png", "decode ms / token (median)", "context (tokens)")
