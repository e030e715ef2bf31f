"""MXFP4 against the OCP spec's value table, hand-packed bytes, brute-force rounding and transformers' decoder."""

from __future__ import annotations

import itertools

import pytest
import torch

from gptoss import mxfp4
from gptoss.errors import MXFP4Error

# OCP MX spec, FP4 E2M1: code = s eee m ... magnitudes by 3-bit code, then the sign bit.
SPEC_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def hand_pack(values: list[float], exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack 32 grid values by hand: byte j = code(2j) | code(2j+1) << 4."""
    codes = []
    for v in values:
        m = SPEC_MAGNITUDES.index(abs(v) / 2.0**exponent)
        codes.append(m | (8 if v < 0 or (v == 0 and str(v).startswith("-")) else 0))
    data = bytes(codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16))
    return torch.tensor(list(data), dtype=torch.uint8)[None], torch.tensor([127 + exponent], dtype=torch.uint8)


def test_dequantize_hand_packed_bytes():
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 0.0] * 2
    for exponent in (-3, 0, 5):
        scaled = [v * 2.0**exponent for v in values]
        blocks, scales = hand_pack(scaled, exponent)
        assert mxfp4.dequantize(blocks, scales, torch.float32).tolist() == scaled
    # Element order inside a byte: 0x21 holds 0.5 (code 1, low nibble, element 0) then 1.0 (code 2, element 1).
    blocks = torch.full((1, 16), 0x21, dtype=torch.uint8)
    assert mxfp4.dequantize(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)[:2].tolist() == [0.5, 1.0]


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=g)  # [E, out, in/32, 16]
    scales = torch.randint(100, 150, (3, 8, 4), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    ours = mxfp4.dequantize(blocks, scales, torch.float32)  # [E, out, in]
    assert torch.equal(ours.transpose(1, 2), theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_values_round_trip(dtype):
    edge = [0.0, -0.0, 6.0, -6.0, 0.5, -0.5, 1.5, 3.0, 4.0, -4.0] + [0.0] * 22
    w = torch.tensor(edge, dtype=dtype)
    blocks, scales = mxfp4.quantize(w)
    assert scales.item() == 127  # max |x| = 6 needs scale 1
    back = mxfp4.dequantize(blocks, scales, dtype)
    assert torch.equal(back, w)  # -0.0 == 0.0 numerically; it is stored as +0
    assert blocks.flatten()[-5:].tolist() == [0] * 5  # the trailing zeros pack to zero bytes


def test_grid_values_round_trip_exactly_at_every_scale():
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor(SPEC_MAGNITUDES + [-v for v in SPEC_MAGNITUDES[1:]])
    codes = torch.randint(0, len(grid), (64, 32), generator=g)
    codes[:, 0] = 7  # every block reaches 6 so the scale is pinned to its exponent
    exponents = torch.randint(-100, 100, (64, 1), generator=g)
    w = torch.ldexp(grid[codes], exponents.float())
    blocks, scales = mxfp4.quantize(w)
    assert torch.equal(scales.long(), exponents + 127)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32), w)


def brute_force_nearest(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Nearest of the 15 signed grid values, ties to the even code (independent of the library's thresholds)."""
    out = []
    for v in x.tolist():
        best = min(range(8), key=lambda m: (abs(abs(v) - SPEC_MAGNITUDES[m] * scale), m % 2))
        out.append(SPEC_MAGNITUDES[best] * scale * (-1 if v < 0 else 1))
    return torch.tensor(out)


def test_rounding_is_nearest_with_ties_to_even():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=g) * 3
    w[0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])  # every midpoint, scale 1
    blocks, scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(blocks, scales, torch.float32).view(16, 32)
    for row in range(16):
        scale = 2.0 ** (scales[row].item() - 127)
        assert torch.equal(back[row], brute_force_nearest(w[row], scale)), row
        assert w[row].abs().max() <= 6 * scale and (scale == 2.0**-127 or w[row].abs().max() > 3 * scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected_with_location(bad):
    w = torch.zeros(2, 64)
    w[1, 37] = bad
    with pytest.raises(MXFP4Error, match=r"experts.*index \[1, 37\].*not finite"):
        mxfp4.quantize(w, name="experts")


def test_malformed_inputs_rejected():
    with pytest.raises(MXFP4Error, match="multiple of the MXFP4 block size"):
        mxfp4.quantize(torch.zeros(4, 40), name="w")
    with pytest.raises(MXFP4Error, match="do not match"):
        mxfp4.dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(MXFP4Error, match="uint8"):
        mxfp4.dequantize(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))


def test_extreme_magnitudes():
    blocks, scales = mxfp4.quantize(torch.full((32,), 1e-39))  # needs a scale below 2^-127: flushes
    assert scales.item() == 0 and mxfp4.dequantize(blocks, scales, torch.float32).abs().max() <= 2.0**-126
    w = torch.full((32,), 1e38)  # near the fp32 maximum: 1e38 / 2^124 = 4.7 rounds to 4
    blocks, scales = mxfp4.quantize(w)
    assert scales.item() == 127 + 124
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32), torch.full((32,), 4 * 2.0**124))


def test_all_codes_decode_to_spec_table():
    pairs = list(itertools.product(range(16), repeat=2))[:16]
    blocks = torch.tensor([[lo | hi << 4 for lo, hi in pairs]], dtype=torch.uint8)
    out = mxfp4.dequantize(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    signed = SPEC_MAGNITUDES + [-v for v in SPEC_MAGNITUDES]
    assert out.tolist() == [signed[c] for pair in pairs for c in pair]
