"""MXFP4 expert matvec on gpt-oss-20b shapes: the fused kernel vs a bf16 matvec of the same weight (the peer
that reads 3.8× more bytes), vs the pure-torch dequantize-then-matmul fallback, and the read bandwidth.

    python benchmarks/bench_kernels.py [--threads 2]

Effective GB/s = MXFP4 bytes of the experts read (blocks + scales) / time; the bf16 line uses its own bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptoss.kernels import kernels_available, mxfp4_linear

E, D, I = 32, 2880, 2880  # gpt-oss-20b: experts, hidden, expert width


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert kernels_available(), "the C++ kernels did not build"
    g = torch.Generator().manual_seed(0)
    a = torch.ones(2**28)  # 1 GiB
    bandwidth = a.numel() * 4 / timed(lambda: a.sum(), 5)
    del a
    print(f"threads {torch.get_num_threads()}, read bandwidth (1 GiB sum) {bandwidth / 1e9:.1f} GB/s\n")
    print("| weight | rows (experts) | kernel ms (bf16 x) | GB/s | kernel ms (fp32 x, precise) | GB/s "
          "| bf16 matvec ms | bf16 GB/s | torch fallback ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, N, K in (("mlp1 (gate/up) 5760×2880", 2 * I, D), ("mlp2 (down) 2880×2880", D, I)):
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 126, (E, N, K // 32), dtype=torch.uint8, generator=g)
        bias = torch.randn(E, N, generator=g)
        dense = torch.randn(4, N, K, generator=g).to(torch.bfloat16)  # 4 experts' bf16 weights, for the peer
        for rows in (1, 4):
            ids = torch.arange(rows) * 7 % E  # distinct experts, as in a decode step
            x = torch.randn(rows, K, generator=g)
            nbytes = rows * N * (K // 2 + K // 32)
            xb = x.to(torch.bfloat16)
            t_kernel = timed(lambda: mxfp4_linear(xb, blocks, scales, bias, ids), args.repeats)
            t_precise = timed(lambda: mxfp4_linear(x, blocks, scales, bias, ids), args.repeats)
            t_bf16 = timed(lambda: [torch.nn.functional.linear(xb[r:r + 1], dense[r]) for r in range(rows)],
                           args.repeats)
            t_torch = timed(lambda: mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=False), 3)
            print(f"| {name} | {rows} | {1e3 * t_kernel:.2f} | {nbytes / t_kernel / 1e9:.1f} | "
                  f"{1e3 * t_precise:.2f} | {nbytes / t_precise / 1e9:.1f} | "
                  f"{1e3 * t_bf16:.2f} | {rows * N * K * 2 / t_bf16 / 1e9:.1f} | {1e3 * t_torch:.1f} |", flush=True)


if __name__ == "__main__":
    main()
