"""Checked access to .safetensors files: header validation with clear errors, mmap'd tensor reads.

The safetensors library does the reading (memory-mapped, zero-copy) and writing; this module first checks
the header itself so that a truncated, foreign or corrupt file fails with one message naming the file and
the tensor, instead of a Rust panic string. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 2**20  # the format caps headers at 100 MB


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype tag, e.g. "BF16", "U8"
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # of the tensor's first byte in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check one file's header without reading tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file, or truncated "
                                      f"(header length {n} but file has {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry: {entry!r}") from None
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if end - start != expected or start < 0:
            raise CheckpointError(f"{path}: tensor '{name}' spans {end - start} bytes but shape {list(shape)} "
                                  f"{dtype} needs {expected}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated — tensor '{name}' ends at byte {end} of the data section, "
                                  f"which has only {data_size} bytes")
        infos[name] = TensorInfo(path, dtype, shape, expected, 8 + n + start)
    return infos


class SafetensorsFiles:
    """A set of .safetensors files read as one name → tensor mapping (memory-mapped)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.index: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self.index:
                    raise CheckpointError(f"tensor '{name}' appears in both {self.index[name].file} and {file}")
                self.index[name] = info
        self._handles = {file: safe_open(str(file), framework="pt") for file in files}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return list(self.index)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by the mmap'd file (no copy until it is written or converted)."""
        info = self.index[name]
        return self._handles[info.file].get_tensor(name)


    def get_slice(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The region `index` (one step-1 slice per leading dimension) as a tensor of its own (tensor
        parallelism: a rank reads only its shard). A range of the first dimension is one contiguous file read;
        a range of an inner dimension is copied out of the memory map, which touches only the pages it spans."""
        info = self.index[name]
        bounds = [s.indices(n) for s, n in zip(index, info.shape)]
        if any(step != 1 for _, _, step in bounds):
            raise CheckpointError(f"{info.file}: tensor '{name}': slices must have step 1, got {index}")
        inner = bounds[1:]
        if any((a, b) != (0, n) for (a, b, _), n in zip(inner, info.shape[1:])):
            return self.get(name)[index].clone(memory_format=torch.contiguous_format)
        first, last = bounds[0][:2] if bounds else (0, info.shape[0] if info.shape else 1)
        out = torch.empty(max(last - first, 0), *info.shape[1:], dtype=DTYPES[info.dtype])
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        buffer = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(info.file, "rb") as f:
            f.seek(info.offset + first * row_bytes)
            done = f.readinto(buffer)
        if done != out.numel() * out.element_size():
            raise CheckpointError(f"{info.file}: truncated — tensor '{name}' rows {first}:{last} have {done} bytes")
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy the tensor's bytes into `out` (contiguous CPU, same byte size) with file reads, not through
        the mmap: pages read this way sit in the page cache but never in this process's resident set, so
        fusing separate tensors (q/k/v) does not count the checkpoint's bytes twice in peak RSS."""
        info = self.index[name]
        if not out.is_contiguous() or out.device.type != "cpu" or out.numel() * out.element_size() != info.nbytes:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}' ({info.nbytes} bytes) into "
                                  f"{out.dtype} {list(out.shape)}")
        buffer = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            done = f.readinto(buffer)
        if done != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated — tensor '{name}' has {done} of {info.nbytes} bytes")


def save_file(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file as _save

    # safetensors ≥ 0.8 writes a private (0600) temporary and renames it over `path`: keep the mode the file
    # gets from the umask (or already has), or a checkpoint written for a server or a container is unreadable.
    path = Path(path)
    path.touch()
    mode = path.stat().st_mode & 0o777
    _save({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    path.chmod(mode)
