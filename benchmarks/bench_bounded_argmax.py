"""Decode steps with all logits against BoundedArgmax, paired in one process (the host's memory bandwidth moves
more between programs than this changes): steps alternate between the two, the order flipped every pair.

    python benchmarks/bench_bounded_argmax.py /work/ckpt/gpt-oss-20b --pairs 30
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from bench_decode import fill_cache, touch_weights
from scipy.stats import binomtest, ttest_1samp

import gptoss
from gptoss.generate import SamplingParams, decode_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--pairs", type=int, default=30, help="at most 32")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = gptoss.load(args.model, dtype=torch.bfloat16)
    touch_weights(model)
    t = time.perf_counter()
    if not model.enable_bounded_argmax():
        raise SystemExit("BoundedArgmax needs a bf16 unembedding on the CPU")
    build_s = time.perf_counter() - t
    if 2 * args.pairs > 64:  # fill_cache leaves room for 64 more tokens
        raise SystemExit(f"--pairs {args.pairs}: at most 32")
    cache = fill_cache(model, args.context)
    greedy = [(SamplingParams(temperature=0), None)]
    token, pos = torch.tensor([[1000]]), args.context
    times: dict[bool, list[float]] = {True: [], False: []}
    candidates = []
    for s in range(args.pairs):
        for bounded in ((True, False) if s % 2 else (False, True)):
            model.bounded_argmax_wanted = bounded
            t = time.perf_counter()
            logits, chosen = decode_step(model, token, torch.tensor([[pos]]), cache, greedy)
            tok = int(logits.argmax()) if chosen is None else chosen[0]
            times[bounded].append(time.perf_counter() - t)
            if bounded:
                candidates.append(model.bounded_argmax.last_candidates)
            pos += 1
        token = torch.tensor([[tok]])
    full, bnd = times[False][1:], times[True][1:]  # the first pair pays page faults
    ratios = [f / b for f, b in zip(full, bnd)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"BoundedArgmax built in {build_s:.2f} s; step median: all logits {1e3 * statistics.median(full):.1f} ms, "
          f"bounded {1e3 * statistics.median(bnd):.1f} ms; all / bounded per pair: median "
          f"{statistics.median(ratios):.3f} (IQR {q1:.3f}–{q3:.3f}), t on log ratios p = "
          f"{ttest_1samp([math.log(r) for r in ratios], 0).pvalue:.2g}, sign test p = "
          f"{binomtest(sum(r > 1 for r in ratios), len(ratios)).pvalue:.2g}, {len(ratios)} pairs; candidates per "
          f"step: median {statistics.median(candidates)}, max {max(candidates)}")


if __name__ == "__main__":
    main()
