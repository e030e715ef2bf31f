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

import mmap
from pathlib import Path

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


def _anonymous(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """An anonymous mapping advised MADV_HUGEPAGE and a uint8 view of nbytes of it starting on a 2 MiB boundary."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to align the start
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return region, raw[start:start + nbytes]


def to_hugepages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Copy every CPU parameter and buffer of at least `min_bytes` into huge-page memory, in place (the modules
    keep their tensors' names, shapes and dtypes); the mappings live as long as the model. Returns the bytes
    moved."""
    regions = getattr(model, "_hugepage_regions", [])
    moved = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or tensor.device.type != "cpu" or tensor.nbytes < min_bytes:
                    continue
                region, raw = _anonymous(tensor.nbytes)
                copy = raw.view(tensor.dtype).view(tensor.shape)
                copy.copy_(tensor)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = copy
                else:
                    table[name] = copy
                regions.append(region)
                moved += tensor.nbytes
    model._hugepage_regions = regions  # the mappings must outlive the views
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
