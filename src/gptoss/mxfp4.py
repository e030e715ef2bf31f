"""MXFP4: 32 FP4 (e2m1) values share one power-of-two scale (OCP Microscaling Formats spec v1.0).

Storage, as in the GPT-oss checkpoints, for a weight W[out, in]:
  blocks [out, in/32, 16] uint8 — two FP4 codes per byte, element 2j in the low nibble, 2j+1 in the high one;
  scales [out, in/32]     uint8 — biased exponent, scale = 2^(s - 127).
An FP4 code is sign bit (bit 3) + 3 magnitude bits indexing {0, .5, 1, 1.5, 2, 3, 4, 6}.
"""

from __future__ import annotations

import torch

from .errors import MXFP4Error

BLOCK = 32  # values per block
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
# Rounding |x| to the nearest magnitude code: midpoints between neighbouring values, and whether a tie
# rounds up (to the even code above) or down (to the even code below) — round-half-to-even on the code.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 → values [..., G*32] in `dtype` (exact in bf16/fp32)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MXFP4Error(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise MXFP4Error(f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
                         f"expected blocks [..., G, {BYTES_PER_BLOCK}] and scales [..., G]")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # [..., G, 16, 2]: low nibble first
    values = lut[codes].flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1).float())
    return values.flatten(-2).to(dtype)


def quantize(w: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) → (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).

    Each block takes the smallest power-of-two scale that keeps its largest magnitude within ±6, then every
    value rounds to the nearest FP4 value (ties to even). Values already on the MXFP4 grid round-trip exactly.
    """
    if not w.is_floating_point():
        raise MXFP4Error(f"{name}: cannot quantize dtype {w.dtype} to MXFP4, expected a floating-point tensor")
    if w.shape[-1] % BLOCK:
        raise MXFP4Error(f"{name}: last dimension {w.shape[-1]} is not a multiple of the MXFP4 block size {BLOCK}")
    x = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)  # [..., G, 32]
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        index = (*bad[:-2], bad[-2] * BLOCK + bad[-1])
        raise MXFP4Error(f"{name}: value {x[tuple(bad)].item()} at index {list(index)} is not finite; "
                         "MXFP4 cannot represent NaN or infinity")
    amax = x.abs().amax(dim=-1)  # [..., G]
    # exponent e = ceil(log2(amax / 6)), taken exactly from frexp: amax/6 = m·2^p with m in [0.5, 1).
    mant, p = torch.frexp(amax / FP4_MAX)
    exponent = torch.where(mant == 0.5, p - 1, p)
    exponent = torch.where(amax == 0, torch.full_like(exponent, -SCALE_BIAS), exponent)
    # Finite fp32 values never need a scale above 2^126. Blocks so small they would need a scale below 2^-127 take the smallest scale (and flush toward zero).
    exponent = exponent.clamp(min=-SCALE_BIAS)
    scaled = torch.ldexp(x, -exponent.unsqueeze(-1).float()).abs()  # magnitudes in [0, 6]
    code = torch.zeros_like(scaled, dtype=torch.uint8)
    for mid, up in zip(_MIDPOINTS, _TIE_UP):
        code += (scaled >= mid if up else scaled > mid).to(torch.uint8)
    code |= (torch.signbit(x) & (code > 0)).to(torch.uint8) << 3  # -0.0 stored as +0
    code = code.reshape(*code.shape[:-1], BYTES_PER_BLOCK, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def nbytes(blocks: torch.Tensor, scales: torch.Tensor) -> int:
    return blocks.numel() * blocks.element_size() + scales.numel() * scales.element_size()
