"""MXFP4 expert matvec on gpt-oss-20b shapes (32 experts): the fused C++ kernel vs a bf16 torch matvec of a
dense weight of the same shape (the peer, reading 3.8x the bytes), an fp32 one, the pure-torch fallback, and
the machine's read bandwidth.

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 30]

Each repeat uses other experts (and the dense peers cycle through 8 weights), so weights come from DRAM as
in a real decode step rather than from the last-level cache. GB/s = bytes of weights read / median time:
MXFP4 blocks + scales of the selected experts for the kernel and the fallback, 2 or 4 bytes a value for the
dense peers. Rows = distinct experts, one activation row each (4 = one decode step's top-4).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gptoss.kernels import kernels_available, load_kernels, mxfp4_dequantize, mxfp4_linear

E, D, I = 32, 2880, 2880  # gpt-oss-20b: experts, hidden size, expert width
DENSE = 8  # dense peer weights cycled through (8 × 33 MB > the last-level cache)


def timed(fn: Callable[[int], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn(i) over `repeats` calls, i = the call's index (to pick other weights)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels_available():
        raise SystemExit("the C++ kernels are not available (GPTOSS_KERNELS=0 or the build failed)")
    g = torch.Generator().manual_seed(0)

    a = torch.ones(2**28)  # 1 GiB
    read = a.numel() * 4 / timed(lambda i: a.sum(), 7)
    b = torch.empty_like(a)
    copy = 2 * a.numel() * 4 / timed(lambda i: b.copy_(a), 7)
    del a, b
    print(f"threads {torch.get_num_threads()}, SIMD {load_kernels().simd()}; memory bandwidth (1 GiB): "
          f"read (sum) {read / 1e9:.1f} GB/s, copy (read + write) {copy / 1e9:.1f} GB/s\n")

    print("| weight | rows | MXFP4 kernel ms | GB/s | of read bw | bf16 matvec ms | GB/s | fp32 matvec ms | GB/s "
          "| torch fallback ms | GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, N, K in (("mlp1 up 5760×2880", 2 * I, D), ("mlp2 down 2880×2880", D, I)):
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(119, 128, (E, N, K // 32), dtype=torch.uint8, generator=g)
        bias = torch.randn(E, N, generator=g).to(torch.bfloat16)
        dense = torch.randn(DENSE, N, K, generator=g).to(torch.bfloat16)
        dense32 = dense[:4].float()  # 4 × 66 MB, also beyond the cache
        for rows in (1, 4):
            x = torch.randn(rows, K, generator=g).to(torch.bfloat16)
            experts = lambda i: (torch.arange(rows) * 8 + 5 * i) % E  # noqa: E731  distinct, rotating
            mx_bytes = rows * N * (K // 2 + K // 32)
            t_kernel = timed(lambda i: mxfp4_linear(x, blocks, scales, bias, experts(i)), args.repeats)
            t_bf16 = timed(lambda i: [torch.nn.functional.linear(x[r:r + 1], dense[(rows * i + r) % DENSE])
                                      for r in range(rows)], args.repeats)
            x32 = x.float()
            t_fp32 = timed(lambda i: [torch.nn.functional.linear(x32[r:r + 1], dense32[(rows * i + r) % 4])
                                      for r in range(rows)], args.repeats)
            t_torch = timed(lambda i: mxfp4_linear(x, blocks, scales, bias, experts(i), use_kernels=False), 3, 1)
            print(f"| {name} | {rows} | {1e3 * t_kernel:.3f} | {mx_bytes / t_kernel / 1e9:.1f} | "
                  f"{mx_bytes / t_kernel / read:.2f} | {1e3 * t_bf16:.2f} | {rows * N * K * 2 / t_bf16 / 1e9:.1f} | "
                  f"{1e3 * t_fp32:.2f} | {rows * N * K * 4 / t_fp32 / 1e9:.1f} | "
                  f"{1e3 * t_torch:.1f} | {mx_bytes / t_torch / 1e9:.2f} |", flush=True)
        del dense, dense32

    print("\nPrefill path, one expert: mxfp4_dequantize (C++) vs gptoss.mxfp4.dequantize (torch)\n")
    print("| weight | dtype | C++ ms | torch ms | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, N, K in (("mlp1 up 5760×2880", 2 * I, D), ("mlp2 down 2880×2880", D, I)):
        blocks = torch.randint(0, 256, (4, N, K // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(119, 128, (4, N, K // 32), dtype=torch.uint8, generator=g)
        for dtype in (torch.bfloat16, torch.float32):
            t_cpp = timed(lambda i: mxfp4_dequantize(blocks[i % 4], scales[i % 4], dtype), 10)
            t_ref = timed(lambda i: mxfp4_dequantize(blocks[i % 4], scales[i % 4], dtype, use_kernels=False), 3, 1)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {1e3 * t_cpp:.2f} | {1e3 * t_ref:.1f} | "
                  f"{t_ref / t_cpp:.0f}× |", flush=True)


if __name__ == "__main__":
    main()
