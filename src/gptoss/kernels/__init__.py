"""MXFP4 kernels: a C++ extension built on first use (torch cpp_extension + the machine's compiler, cached
under ~/.cache/torch_extensions), with an exact pure-torch fallback when no compiler is available.

    mxfp4_linear(x, blocks, scales, bias, expert_ids)  row m of x times expert expert_ids[m] (decode path)
    mxfp4_dequantize(blocks, scales, dtype)            whole tensors (prefill path: one expert, then a GEMM)

Set GPTOSS_KERNELS=0 to force the fallback.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .. import mxfp4
from ..errors import MXFP4Error

_SOURCE = Path(__file__).with_name("mxfp4_cpu.cpp")


@functools.lru_cache(maxsize=1)
def _build() -> ModuleType | None:
    try:
        from torch.utils import cpp_extension

        # -fopenmp: at::parallel_for is inlined from ATen's headers and is serial without it
        flags = ["-O3", "-march=native", "-fopenmp"]
        return cpp_extension.load(name="gptoss_mxfp4_cpu", sources=[str(_SOURCE)], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, a build error: the fallback still gives exact results
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        warnings.warn(f"gptoss: MXFP4 CPU kernels could not be built ({reason}); using the slower pure-torch "
                      "path", RuntimeWarning, stacklevel=3)
        return None


def load_kernels() -> ModuleType | None:
    """The compiled kernels, or None (GPTOSS_KERNELS=0, or the build failed)."""
    if os.environ.get("GPTOSS_KERNELS", "1") == "0":
        return None
    return _build()


def kernels_available() -> bool:
    return load_kernels() is not None


def _check(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
           expert_ids: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != mxfp4.BYTES_PER_BLOCK:
        raise MXFP4Error(f"mxfp4_linear: blocks must be uint8 [E, N, K/32, 16], got {blocks.dtype} "
                         f"{list(blocks.shape)}")
    if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:3]):
        raise MXFP4Error(f"mxfp4_linear: scales must be uint8 {list(blocks.shape[:3])} to match blocks, got "
                         f"{scales.dtype} {list(scales.shape)}")
    E, N, G = blocks.shape[:3]
    if x.dim() != 2 or x.shape[1] != G * mxfp4.BLOCK or not x.is_floating_point():
        raise MXFP4Error(f"mxfp4_linear: x must be floating [M, {G * mxfp4.BLOCK}], got {x.dtype} {list(x.shape)}")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise MXFP4Error(f"mxfp4_linear: bias must be [{E}, {N}], got {list(bias.shape)}")
    if expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0] or expert_ids.is_floating_point():
        raise MXFP4Error(f"mxfp4_linear: expert_ids must be integer [{x.shape[0]}], got {expert_ids.dtype} "
                         f"{list(expert_ids.shape)}")
    if expert_ids.numel() and not (0 <= int(expert_ids.min()) and int(expert_ids.max()) < E):
        raise MXFP4Error(f"mxfp4_linear: expert_ids must lie in [0, {E}), got {expert_ids.tolist()[:16]}")


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 expert_ids: torch.Tensor, use_kernels: bool | None = None) -> torch.Tensor:
    """out[m] = x[m] @ W[expert_ids[m]].T + bias[expert_ids[m]], fp32 [M, N], W = dequantize(blocks, scales).

    The kernel reads each selected expert's 4-bit bytes once per call (rows sharing an expert share the
    pass) and never writes a dequantized copy. Activations enter as 16-bit fixed point per 32-value block
    (two parts for fp32 inputs: error ≈ 2^-30 of the block's max; one part for bf16/fp16 inputs: exact when a
    block spans < 2^6, else ≤ 2^-15 of its max), weights exactly, with integer block sums.
    use_kernels: None = when available, False = pure torch.
    """
    _check(x, blocks, scales, bias, expert_ids)
    lib = load_kernels() if use_kernels is not False and x.device.type == "cpu" else None
    if use_kernels and lib is None:
        raise MXFP4Error("mxfp4_linear: the compiled kernels are not available here")
    x32 = x.float().contiguous()
    ids = expert_ids.long().contiguous()
    if lib is not None:
        b = bias.float().contiguous() if bias is not None else torch.empty(0)
        precise = x.dtype not in (torch.bfloat16, torch.float16)  # 16-bit inputs fit one int16 part
        return lib.mxfp4_linear(x32, blocks.contiguous(), scales.contiguous(), b, ids, precise)
    out = torch.empty(x.shape[0], blocks.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():  # one expert dequantized at a time
        rows = (ids == e).nonzero(as_tuple=True)[0]
        w = mxfp4.dequantize(blocks[e], scales[e], torch.float32)
        out[rows] = x32[rows] @ w.T + (bias[e].float() if bias is not None else 0)
    return out


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                     use_kernels: bool | None = None) -> torch.Tensor:
    """Equal, bit for bit, to gptoss.mxfp4.dequantize; much faster on CPU."""
    lib = load_kernels() if use_kernels is not False and blocks.device.type == "cpu" else None
    if lib is None or dtype not in (torch.float32, torch.bfloat16):
        return mxfp4.dequantize(blocks, scales, dtype)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != mxfp4.BYTES_PER_BLOCK \
            or blocks.shape[:-1] != scales.shape:
        return mxfp4.dequantize(blocks, scales, dtype)  # raises the descriptive error
    return lib.mxfp4_dequantize(blocks.contiguous(), scales.contiguous(), dtype == torch.bfloat16)
