"""What it costs to touch fresh anonymous memory: 4 KiB pages against transparent huge pages.

    python benchmarks/bench_first_touch.py --gib 6 --order 4k huge 4k huge

The expert pool (streaming.py) is anonymous memory filled as slots first load. In a virtual machine the first
touch of a guest page can also fault on the host, so the pool's first fill costs system time that reads do
not explain; this measures it apart, per page size, first and second time.
"""

import argparse
import resource
import time

import torch

from gptoss import hugepages


def touch(kind: str, nbytes: int) -> tuple[float, float, int]:
    """(wall s, system s, minor faults) to allocate nbytes and write one byte per 4 KiB page."""
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    x = torch.empty(nbytes, dtype=torch.uint8) if kind == "4k" else hugepages.empty((nbytes,))
    x[::4096] = 1
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    del x
    return wall, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=6.0)
    p.add_argument("--order", nargs="+", default=["4k", "huge", "4k", "huge"], choices=["4k", "huge"])
    args = p.parse_args()
    for kind in args.order:
        wall, system, faults = touch(kind, int(args.gib * 2**30))
        print(f"{kind}: wall {wall:.2f} s, system {system:.2f} s, minor faults {faults}")


if __name__ == "__main__":
    main()
