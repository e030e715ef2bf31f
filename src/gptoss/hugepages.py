"""Weights in anonymous memory on 2 MiB pages (transparent huge pages), instead of the checkpoint's mmap.

A loaded checkpoint's tensors are views of the safetensors files: page-cache pages of 4 KiB. A decode step
streams ≈ 1–2 GB of them, so it also walks the page tables for every 4 KiB; in a virtual machine each walk is
two-dimensional (guest and host tables), which costs memory accesses of its own. llama.cpp copies (repacks)
its CPU weights into anonymous memory at load. `to_hugepages` does the same for a model's CPU tensors, on
memory advised `MADV_HUGEPAGE` (which Linux honours when transparent_hugepage is `always` or `madvise`). The
values are copied bit for bit; the cost is that the weights become anonymous memory (resident, not evictable
page cache), so it is only for a model that fits in RAM with room to spare.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

HUGE_PAGE = 2 << 20


def supported() -> bool:
    """Whether this kernel gives anonymous memory huge pages on request."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and ("[always]" in mode or "[madvise]" in mode)


def empty(shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised CPU tensor in anonymous memory advised MADV_HUGEPAGE, starting on a 2 MiB boundary. The
    tensor keeps its mapping alive (torch.frombuffer holds a reference to it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    region = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE,  # room to align the start
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)


def to_hugepages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Copy every CPU parameter and buffer of at least `min_bytes` into huge-page memory, in place (the modules
    keep their tensors' names, shapes and dtypes). Returns the bytes moved."""
    moved = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or tensor.device.type != "cpu" or tensor.nbytes < min_bytes:
                    continue
                copy = empty(tensor.shape, tensor.dtype).copy_(tensor)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = copy
                else:
                    table[name] = copy
                moved += tensor.nbytes
    return moved


def anonymous_huge_bytes() -> int:
    """This process's anonymous memory on huge pages (/proc/self/smaps_rollup's AnonHugePages)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
