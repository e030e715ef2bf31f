"""What the experiments share: a synthetic task where routing matters, a small GPT-oss MoE config, a step
budget from a measured step time, one training run through `gptoss.train.train`, and markdown/PNG output.

The task ("clustered Markov"): 8 clusters of 16 token ids each (vocabulary 128). A document picks a cluster,
then walks that cluster's own random successor table (each token has 2 successors, chosen with probability
1/2), so the best achievable loss is log 2 ≈ 0.693 nats once a model knows the cluster tables, and a token's
cluster is a feature a router can specialise on. Generated in code from a fixed seed (TASK_SEED).
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import GptOssError
from ..train.moe import collapse_router, collapse_router_by_layer

TASK_SEED = 1234
CLUSTERS, CLUSTER_VOCAB = 8, 16
VOCAB = CLUSTERS * CLUSTER_VOCAB
BEST_LOSS = math.log(2)  # two equally likely successors


N_TRAIN, N_HELDOUT = 600, 100  # documents; the held-out ones continue the same random stream


def clustered_markov(n_docs: int = N_TRAIN, length: int = 65, seed: int = TASK_SEED):
    """Documents of the clustered Markov task (see the module docstring)."""
    from ..train.data import Document

    r = random.Random(seed)
    succ = [[r.sample(range(CLUSTER_VOCAB), 2) for _ in range(CLUSTER_VOCAB)] for _ in range(CLUSTERS)]
    return [Document([c * CLUSTER_VOCAB + t for t in x]) for c, x in markov_walks(r, succ, n_docs, length)]


def markov_walks(r: random.Random, succ: list, n_docs: int, length: int) -> list[tuple[int, list[int]]]:
    """(cluster, tokens) for n_docs walks: a random cluster, a random first token, then one of the two
    successors of the last token in that cluster's table at each step."""
    walks = []
    for _ in range(n_docs):
        c = r.randrange(CLUSTERS)
        x = [r.randrange(len(succ[c]))]
        for _ in range(length - 1):
            x.append(succ[c][x[-1]][r.randrange(2)])
        walks.append((c, x))
    return walks


def heldout_loss(model, seq_len: int = 64, docs=None) -> float:
    """Mean next-token loss (fp32, no grad) on N_HELDOUT documents of the same clusters and successor tables
    that the model never trained on: training losses here fall below log 2 by memorising the 600 documents.
    docs: other held-out documents (another task's)."""
    import torch

    from ..train.data import PackedDataset
    from ..train.loop import lm_loss_sum

    if docs is None:
        docs = clustered_markov(N_TRAIN + N_HELDOUT)[N_TRAIN:]  # the first N_TRAIN are the training documents
    data = PackedDataset(docs, seq_len, VOCAB, shuffle=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, data.num_samples, 16):
            s, n = lm_loss_sum(model, data.batch(list(range(i, min(i + 16, data.num_samples)))))
            total, count = total + float(s), count + n
    return total / max(1, count)


# ---------------------------------------------------------------- tasks that need context (ladder, sliding-window)
ALPHABET = 32  # contextual Markov: ids 0..31, shared by every cluster
COPY_IDS = range(32, VOCAB)  # far copy: 96 ids the Markov documents never use


def successor_tables(seed: int = TASK_SEED) -> tuple[random.Random, list]:
    r = random.Random(seed)
    return r, [[r.sample(range(ALPHABET), 2) for _ in range(ALPHABET)] for _ in range(CLUSTERS)]


@functools.lru_cache(maxsize=8)
def contextual_markov(n_docs: int, length: int, seed: int = TASK_SEED) -> tuple:
    """Documents of exactly `length` tokens (a packed sequence of that length holds exactly one). Each picks one
    of 8 clusters, whose successor tables (2 successors per token, probability ½ each) live on one shared
    32-token alphabet: a token says nothing about its cluster, the transitions seen so far do, so predicting
    well needs the document's history, not just the last token (the Bayes-optimal loss: markov_optimum).
    Cached: the same arguments give the same (immutable) tuple."""
    from ..train.data import Document

    r, succ = successor_tables(seed)
    return tuple(Document(x) for _, x in markov_walks(r, succ, n_docs, length))


def markov_optimum(docs, seed: int = TASK_SEED) -> list[float]:
    """The Bayes-optimal loss (nats) at each target position of contextual_markov documents (position p predicts
    token p + 1), averaged over `docs`. Exact: the posterior over clusters is uniform over those whose tables
    contain every transition so far, and predicts each of a consistent cluster's 2 successors with probability ½."""
    _, succ = successor_tables(seed)
    total = [0.0] * (len(docs[0].tokens) - 1)
    for d in docs:
        x, alive = d.tokens, set(range(CLUSTERS))
        for t in range(1, len(x)):  # predict x[t] from x[:t]
            p = sum(0.5 for c in alive if x[t] in succ[c][x[t - 1]]) / len(alive)
            total[t - 1] -= math.log(p)
            alive = {c for c in alive if x[t] in succ[c][x[t - 1]]}
    return [v / len(docs) for v in total]


@functools.lru_cache(maxsize=8)
def far_copy(n_docs: int, length: int, span: int, seed: int = TASK_SEED) -> tuple:
    """Documents of exactly `length` tokens: `span` uniformly random ids from COPY_IDS, then the same ids again
    (and again), cut at `length`. Tokens of the first pass are unpredictable (log 96 nats); from position
    span + 1 on, token p equals token p − span, which a two-layer induction circuit finds (Olsson et al. 2022:
    a previous-token head, then a head attending to the token after the earlier occurrence) — but only if its
    second layer reaches span − 1 positions back: a sliding window of fewer than span keys cannot (it holds keys
    p − window + 1 .. p), though two stacked windows reach 2·(window − 1) back through a relay. Cached like
    contextual_markov."""
    from ..train.data import Document

    r = random.Random(seed + 1)
    docs = []
    for _ in range(n_docs):
        x = [r.choice(COPY_IDS) for _ in range(span)]
        docs.append(Document((x * (length // span + 1))[:length]))
    return tuple(docs)


def position_losses(model, docs, seq_len: int) -> list[float]:
    """Mean held-out loss (fp32, no grad) at each target position 0 .. seq_len − 2 of documents of exactly
    seq_len tokens (one document per packed sequence; the last position's target is the next document's)."""
    import torch
    import torch.nn.functional as F

    from ..train.data import PackedDataset

    data = PackedDataset(list(docs), seq_len, VOCAB, shuffle=False)
    total = torch.zeros(seq_len, dtype=torch.float64)
    count = torch.zeros(seq_len, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, data.num_samples, 16):
            b = data.batch(list(range(i, min(i + 16, data.num_samples))))
            logits = model(b.tokens, b.positions, segments=b.segments)  # (B, L, V) fp32
            loss = F.cross_entropy(logits.transpose(1, 2), b.targets, reduction="none")  # (B, L)
            total += (loss * b.mask).sum(0).double()
            count += b.mask.sum(0).double()
    return (total / count.clamp(min=1))[: seq_len - 1].tolist()


def model_shape(size: str = "default") -> dict:
    """The [model] section: a 2-layer, hidden-64, 8-expert top-2 GPT-oss (the `tiny` preset's attention, sinks
    and window 8); size "test" is smaller still, for the unit tests."""
    model = {"preset": "tiny", "vocab_size": VOCAB, "num_hidden_layers": 2, "num_experts": 8,
             "experts_per_token": 2}
    if size == "test":
        model.update(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    return model


def base_config(out_dir: Path, seed: int, steps: int, moe: dict | None = None, size: str = "default",
                **sections: dict) -> dict:
    """The training config of one run: model_shape(size), batch 8 × 64, AdamW 3e-3 → 3e-4 cosine, bf16 autocast
    as `gptoss train` runs by default. sections: per-experiment overrides of [model], [data], [optim], [train]."""
    d = {"model": model_shape(size),
         "data": {"seq_len": 64, "batch_size": 8},
         "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": max(1, steps // 20), "weight_decay": 0.1},
         "moe": dict(moe or {}),
         "train": {"steps": steps + 1, "seed": seed, "out_dir": str(out_dir), "device": "cpu"}}
    for name, overrides in sections.items():
        d[name].update(overrides or {})
    return d


STARTS: dict[str, Callable | None] = {"natural": None, "collapsed": collapse_router,
                                      "staggered": collapse_router_by_layer}


@dataclass
class Context:
    """One invocation: where to write, how long it may take, which seeds, how big."""
    out: Path
    budget_minutes: float = 30.0
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # fixed steps per run (else: from the budget)
    size: str = "default"  # "test": a smaller model for the unit tests
    start: str = "natural"  # router initialisation: "natural" (GPT-2-style init) or "collapsed"
    progress: bool = True
    runs: list[dict] = field(default_factory=list)  # every run's record, written to runs.json

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)


def steps_for(ctx: Context, runs: int, probes: list[dict] | None = None, reserve_s: float = 0.0) -> int:
    """Steps per run so that `runs` runs fit 85% of the budget: a 20-step probe run measures the median step
    time (the trainer's per-step time_s) and the per-run overhead (model build, data packing). The probe always
    starts from the natural init: a collapsed router keeps only 2 experts busy, so probing it under-estimates
    the step time of runs that rebalance (it made a 4-minute collapsed-start budget run ≈ 6 minutes).
    probes: train_run keyword sets to probe instead of the base run (their step times and overheads are
    averaged: experiments whose runs differ in cost); reserve_s: budget kept for work after training."""
    if ctx.steps is not None:
        return ctx.steps
    probe = 20
    per_step, overhead, spent = [], [], 0.0
    for kw in probes or [{"moe": {}}]:
        t0 = time.perf_counter()
        metrics = train_run(ctx, "probe", seed=0, steps=probe, keep=False, start="natural", **kw)["metrics"]
        wall = time.perf_counter() - t0
        spent += wall
        per_step.append(statistics.median(m["time_s"] for m in metrics))
        overhead.append(max(0.0, wall - sum(m["time_s"] for m in metrics)))
    per_step_s, overhead_s = statistics.mean(per_step), statistics.mean(overhead)
    budget_s = 0.85 * (ctx.budget_minutes * 60 - spent - reserve_s) - runs * overhead_s
    steps = int(budget_s / (runs * per_step_s))
    ctx.log(f"probe: {per_step_s:.3f} s/step, {overhead_s:.1f} s overhead per run → {steps} steps per run for "
            f"{runs} runs in {ctx.budget_minutes} min")
    return max(5, steps)


def train_run(ctx: Context, label: str, seed: int, steps: int, moe: dict | None = None, keep: bool = True,
              start: str | None = None, documents: Callable[[], list] | None = None,
              evaluate: Callable[..., dict] | None = None, **sections: dict) -> dict:
    """One training run; returns {label, seed, moe, steps, wall_s, heldout_loss, metrics}.

    Default task: clustered Markov, held-out loss on its unseen documents. documents: a function giving another
    task's training documents; evaluate(model, seq_len) → dict with "loss" (the held-out loss) and anything
    else worth keeping (stored as run["eval"]). sections: [model]/[data]/[optim]/[train] overrides (base_config).
    The trainer saves a checkpoint at its last scheduled step; the schedule is set one step longer and
    stopped with max_steps so no checkpoint is written (experiments keep metrics only)."""
    from ..train import TrainConfig, train

    moe = dict(moe or {})
    out_dir = ctx.out / "work" / f"{label}-seed{seed}"
    d = base_config(out_dir, seed, steps, moe, ctx.size, **sections)
    cfg = TrainConfig.from_dict(d, source=f"experiment {label}")
    t0 = time.perf_counter()
    start = start or ctx.start
    docs = clustered_markov() if documents is None else documents()
    result = train(cfg, documents=docs, progress=False, max_steps=steps, prepare=STARTS[start])
    wall = time.perf_counter() - t0
    run = {"label": label, "seed": seed, "moe": moe, "steps": steps, "wall_s": wall, "start": start,
           "heldout_loss": None, "metrics": result.metrics}
    if keep:
        model, seq_len = result.model.eval(), d["data"]["seq_len"]
        if evaluate is None:
            run["heldout_loss"] = heldout_loss(model, seq_len)
        else:
            run["eval"] = evaluate(model, seq_len)
            run["heldout_loss"] = run["eval"]["loss"]
        ctx.runs.append(run)
        last = result.metrics[-1]
        ctx.log(f"{label:>12} seed {seed}: loss {last['loss']:.4f} (held-out {run['heldout_loss']:.4f}), "
                f"entropy {last['load_entropy']}, dropped {last['dropped_pct']} ({wall:.0f} s)")
    return run


# ---------------------------------------------------------------- summaries and output
def tail_mean(values: list[float], n: int = 10) -> float:
    """Mean of the last n values (per-step metrics are noisy; one step is 512 tokens)."""
    tail = values[-n:]
    return sum(tail) / len(tail)


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def paired(a: list[float], b: list[float], fmt: str = "+.3f") -> str:
    """Mean difference a − b ± sd over seeds, the paired t-test's p (two-sided) and the sign test's p
    (two-sided; with 5 seeds its smallest possible value is 0.062)."""
    stats = scipy_stats()
    d = [x - y for x, y in zip(a, b)]
    t_p = stats.ttest_rel(a, b).pvalue if len(d) > 1 and statistics.pstdev(d) > 0 else float("nan")
    higher = sum(x > 0 for x in d)
    sign_p = stats.binomtest(higher, sum(x != 0 for x in d), 0.5).pvalue if any(d) else 1.0
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return (f"{statistics.mean(d):{fmt}} ± {sd:{fmt.lstrip('+')}} (t-test p = {t_p:.2g}; {higher}/{len(d)} seeds "
            f"higher, sign test p = {sign_p:.2g})")


def fisher(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """Fisher's exact test, two-sided: do two proportions (hits out of n runs) differ?"""
    return scipy_stats().fisher_exact([[hits_a, n_a - hits_a], [hits_b, n_b - hits_b]]).pvalue


def spread(xs: list[float], fmt: str = ".0f") -> str:
    """median (min–max): the spread every timing carries."""
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(ctx: Context, name: str, summary: str, command: str) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    total = sum(r["wall_s"] for r in ctx.runs)
    head = (f"# Experiment `{name}`\n\nCommand: `{command}`  \nstart: {ctx.start}, seeds {list(ctx.seeds)}, "
            f"{ctx.runs[0]['steps'] if ctx.runs else 0} steps per run, training wall time {total:.0f} s\n\n")
    (ctx.out / "results.md").write_text(head + summary)
    (ctx.out / "runs.json").write_text(json.dumps(ctx.runs) + "\n")


def finish_plot(plt, fig, ax, path: Path, ylabel: str, xlabel: str = "step") -> None:
    """Label, legend and save a one-axes step plot, then free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def scipy_stats():
    """scipy.stats (the experiments' paired tests), or a clear error naming the extra that brings it."""
    try:
        from scipy import stats
    except ImportError:
        raise GptOssError("the experiments' statistical tests use scipy, which is not installed: "
                          "pip install 'gptoss[experiments]' (or pip install scipy)") from None
    return stats


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise GptOssError("the experiments plot with matplotlib, which is not installed: "
                          "pip install 'gptoss[experiments]' (or pip install matplotlib)") from None

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    return plt
