"""Prefill time with the MoE's fused MXFP4 kernel against dequantize-then-GEMM, by prompt length: the A/B
behind model.FUSED_ROWS_PER_EXPERT (and its AMX bf16 form). Alternating order in one process (same weights, same page cache).

    python benchmarks/bench_prefill_moe.py /work/ckpt/gpt-oss-20b --lengths 32 128 512 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import gptoss.model as model_module
from gptoss.cache import KVCache, default_cache_dtype
from gptoss.generate import left_pad, prefill
from gptoss.loading import load_model

# rows per expert up to which the fused kernel runs: "grouped" never (the whole prompt dequantizes every expert
# it routes to), "fused" always
VARIANTS = {"grouped": 0, "fused": 1 << 30}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    model = load_model(args.model, device="cpu", dtype="bfloat16", progress=False)
    g = torch.Generator().manual_seed(0)
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        prefill(model, *left_pad([list(range(1000, 1016))], "cpu"), KVCache(model.config, 1, max_len=64,
                                                                             dtype=torch.float32))  # warm-up
        for r in range(args.rounds):
            for n in args.lengths:
                ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
                for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                    model_module.FUSED_ROWS_PER_EXPERT = VARIANTS[name]
                    model_module.FUSED_ROWS_PER_EXPERT_AMX_BF16 = VARIANTS[name]
                    cache = KVCache(model.config, 1, max_len=n + 1, dtype=default_cache_dtype(model.dtype, "cpu"))
                    t0 = time.perf_counter()
                    prefill(model, *left_pad([ids], "cpu"), cache)
                    times.setdefault((n, name), []).append(time.perf_counter() - t0)
    print("| tokens | grouped s (min–max) | fused s (min–max) | grouped / fused |")
    print("|---:|---:|---:|---:|")
    for n in args.lengths:
        a, b = times[(n, "grouped")], times[(n, "fused")]
        print(f"| {n} | {statistics.median(a):.2f} ({min(a):.2f}–{max(a):.2f}) | {statistics.median(b):.2f} "
              f"({min(b):.2f}–{max(b):.2f}) | {statistics.median(a) / statistics.median(b):.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
