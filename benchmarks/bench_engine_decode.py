"""The engine's decode step against `generate`'s, in one process, alternating: whether continuous batching's
SlotCache rows, sampling and outlets cost anything at batch 1 (no HTTP: bench_served_decode.py adds that).

    python benchmarks/bench_engine_decode.py /work/ckpt/gpt-oss-20b --rounds 4

Each run: a 346-token random prompt, 40 greedy tokens; the median and mean time between consecutive tokens.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time

import torch

import gptoss
from gptoss.engine import Engine, Finish
from gptoss.generate import SamplingParams, generate


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    model = gptoss.load(args.model, dtype=getattr(torch, args.dtype))
    prompt = torch.randint(0, 200_000, (346,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.tokens)

    def run_generate() -> list[float]:
        stamps = []
        with torch.inference_mode():
            for _ in generate(model, [prompt], params):
                stamps.append(time.perf_counter())
        return gaps(stamps)

    def run_engine(engine: Engine) -> list[float]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        stamps = []

        def outlet(item):
            if not isinstance(item, Finish):
                stamps.append(time.perf_counter())
            q.put(item)

        engine.submit(prompt, params, outlet)
        while not isinstance(q.get(), Finish):
            pass
        return gaps(stamps)

    medians = {"generate": [], "engine": []}
    with Engine(model, max_concurrency=16, prefix_cache_bytes=0) as engine:
        run_engine(engine)  # the engine thread's first step builds its caches
        for r in range(args.rounds):
            for name in (("generate", "engine") if r % 2 == 0 else ("engine", "generate")):
                g = run_generate() if name == "generate" else run_engine(engine)
                medians[name].append(statistics.median(g))
                print(f"round {r + 1} {name:8s} median {1e3 * medians[name][-1]:.1f} ms, "
                      f"mean {1e3 * statistics.mean(g):.1f} ms", flush=True)
    for name, m in medians.items():
        print(f"{name}: median of medians {1e3 * statistics.median(m):.1f} ms "
              f"(range {1e3 * min(m):.1f}–{1e3 * max(m):.1f})")
    ratios = [g / e for g, e in zip(medians["generate"], medians["engine"])]
    print(f"engine / generate speed (median step): median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}–{max(ratios):.3f})")


if __name__ == "__main__":
    main()
