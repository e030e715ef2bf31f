"""Random GPT-oss weights with the real shapes, dtypes and realistic magnitudes, for tests and benchmarks.

No real weights can be downloaded here, so speed and memory are measured on checkpoints that match the
released ones byte for byte in layout: bf16 dense tensors, MXFP4 experts whose FP4 codes follow a
quantized Gaussian (most codes near zero, a few at ±6) under per-block power-of-two scales.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from . import mxfp4
from .checkpoint import expected_tensors
from .config import ModelConfig


def _fp4_byte_table(sigma_in_fp4_units: float, generator: torch.Generator) -> torch.Tensor:
    """65536 bytes whose two FP4 codes follow a Gaussian quantized to the FP4 grid."""
    grid = torch.tensor(mxfp4.FP4_VALUES)
    samples = (torch.randn(2 * 65536, generator=generator) * sigma_in_fp4_units).clamp(-6, 6)
    codes = (samples[:, None] - grid[None]).abs().argmin(-1).to(torch.uint8)  # nearest code (±0 both fine)
    return codes[0::2] | (codes[1::2] << 4)


def random_tensors(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   zero_experts: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (original name, tensor) one at a time, so a 20b-sized checkpoint streams to disk.
    zero_experts: every expert weight (.blocks) all zero, as a broadcast tensor that takes no memory (stride
    0), not drawn."""
    g = torch.Generator().manual_seed(seed)
    table = _fp4_byte_table(2.4, g)
    for name, (shape, kind) in expected_tensors(config).items():
        if name.endswith(".scales"):
            # Weights with std 1/sqrt(fan_in): the block max (~2.4σ) over 6 gives the exponent, ±1 jitter.
            fan_in = shape[-1] * mxfp4.BLOCK
            exponent = math.ceil(math.log2(2.4 / math.sqrt(fan_in) / 6))
            t = (torch.randint(-1, 2, shape, generator=g) + exponent + mxfp4.SCALE_BIAS).to(torch.uint8)
        elif name.endswith(".blocks") and zero_experts:
            t = torch.zeros((), dtype=torch.uint8).expand(shape)
        elif name.endswith(".blocks"):
            t = torch.empty(shape, dtype=torch.uint8)
            for e in range(shape[0]):  # one expert at a time keeps the index tensor small
                t[e] = table[torch.randint(0, 65536, shape[1:], generator=g, dtype=torch.int32)]
        elif name.endswith(("norm.scale",)):
            t = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        elif name.endswith("sinks"):
            t = torch.randn(shape, generator=g).to(dtype)
        elif name == "embedding.weight":
            t = torch.randn(shape, generator=g).to(dtype)
        elif len(shape) == 1 or name.endswith("_bias"):
            t = (0.02 * torch.randn(shape, generator=g)).to(dtype)
        else:
            t = (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(dtype)
        yield name, t
