"""The MXFP4 CPU kernels against plain dequantize-then-matmul, on random blocks of many shapes."""

from __future__ import annotations

import warnings

import pytest
import torch

from gptoss import mxfp4
from gptoss.errors import MXFP4Error
from gptoss.kernels import kernels_available, load_kernels, mxfp4_dequantize, mxfp4_linear


@pytest.fixture(scope="module", autouse=True)
def built():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build must not pass silently on a machine with a compiler
        assert kernels_available(), "the C++ MXFP4 kernels did not build"


def random_experts(E: int, N: int, K: int, seed: int, lo: int = 118, hi: int = 130):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(lo, hi, (E, N, K // 32), dtype=torch.uint8, generator=g)
    bias = torch.randn(E, N, generator=g)
    return blocks, scales, bias


def reference(x, blocks, scales, bias, ids):
    out = torch.empty(x.shape[0], blocks.shape[1], dtype=torch.float64)
    for m, e in enumerate(ids.tolist()):
        w = mxfp4.dequantize(blocks[e], scales[e], torch.float32).double()
        out[m] = x[m].double() @ w.T + (bias[e].double() if bias is not None else 0)
    return out


@pytest.mark.parametrize("E, M, N, K", [(1, 1, 1, 32), (3, 2, 5, 64), (5, 7, 37, 96), (3, 33, 64, 320),
                                        (32, 4, 17, 2880), (5, 4, 3, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_dequantize_then_matmul_fp32(E, M, N, K, with_bias):
    blocks, scales, bias = random_experts(E, N, K, seed=E * 1000 + M)
    bias = bias if with_bias else None
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)  # wide dynamic range inside blocks
    ids = torch.randint(0, E, (M,), generator=g)
    want = reference(x, blocks, scales, bias, ids)
    got = mxfp4_linear(x, blocks, scales, bias, ids)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    # fp32 inputs: the two-part fixed-point activation leaves only fp32 rounding
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max() + 1e-6
    fallback = mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=False)
    assert (fallback.double() - want).abs().max() <= 2e-6 * want.abs().max() + 1e-6


@pytest.mark.parametrize("M", [1, 4, 9])
def test_linear_bf16_inputs(M):
    """bf16 activations take one 16-bit part: exact for blocks spanning < 2^6, else within 2^-15 of the max."""
    E, N, K = 3, 48, 256
    blocks, scales, bias = random_experts(E, N, K, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
    ids = torch.arange(M) % E
    want = reference(x, blocks, scales, bias, ids)
    got = mxfp4_linear(x, blocks, scales, bias, ids)
    weight_mass = torch.stack([mxfp4.dequantize(blocks[e], scales[e], torch.float32).abs().sum(1)
                               for e in ids.tolist()]).double()  # Σ|w| per output
    bound = 2.0 ** -15 * x.float().abs().max() * weight_mass + 1e-5 * want.abs()
    assert ((got.double() - want).abs() <= bound).all()
    # activations whose blocks span less than 2^6 are exact up to fp32 rounding of the sums
    narrow = (torch.rand(M, K, generator=torch.Generator().manual_seed(9)) + 1).to(torch.bfloat16)
    want = reference(narrow, blocks, scales, bias, ids)
    assert (mxfp4_linear(narrow, blocks, scales, bias, ids).double() - want).abs().max() <= 2e-6 * want.abs().max()


def test_rows_sharing_an_expert_and_noncontiguous_inputs():
    E, N, K = 2, 40, 128
    blocks, scales, bias = random_experts(E, N, K, seed=3)
    x = torch.randn(K, 11).T  # non-contiguous [11, K]
    ids = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1])  # more rows per expert than one pass holds
    want = reference(x, blocks, scales, bias, ids)
    got = mxfp4_linear(x, blocks.transpose(0, 1).contiguous().transpose(0, 1), scales, bias, ids)
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


def test_extreme_scales_and_zero_rows():
    E, N, K = 2, 8, 64
    blocks, scales, bias = random_experts(E, N, K, seed=4, lo=1, hi=254)
    x = torch.randn(3, K)
    x[1] = 0
    ids = torch.tensor([0, 1, 1])
    want = reference(x, blocks, scales, None, ids)
    got = mxfp4_linear(x, blocks, scales, None, ids)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert (got.double()[finite] - want[finite]).abs().max() <= 1e-5 * want[finite].abs().max()
    assert torch.equal(got[1], torch.zeros(N))


def test_nan_activation_propagates():
    blocks, scales, bias = random_experts(1, 4, 64, seed=5)
    x = torch.randn(1, 64)
    x[0, 40] = float("nan")
    assert torch.isnan(mxfp4_linear(x, blocks, scales, bias, torch.zeros(1, dtype=torch.long))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bit_exact(dtype):
    blocks, scales, _ = random_experts(3, 17, 96, seed=6, lo=100, hi=150)
    assert torch.equal(mxfp4_dequantize(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype))
    assert torch.equal(mxfp4_dequantize(blocks[1], scales[1], dtype), mxfp4.dequantize(blocks[1], scales[1], dtype))


def test_fallback_forced_by_environment(monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNELS", "0")
    assert load_kernels() is None
    with pytest.raises(MXFP4Error, match="not available"):
        mxfp4_linear(torch.randn(1, 32), *random_experts(1, 2, 32, 0)[:2], None, torch.zeros(1, dtype=torch.long),
                     use_kernels=True)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 48)), r"x must be floating \[M, 64\]"),
    (dict(blocks=torch.zeros(3, 5, 2, 8, dtype=torch.uint8)), r"blocks must be uint8 \[E, N, K/32, 16\]"),
    (dict(scales=torch.zeros(3, 5, 3, dtype=torch.uint8)), r"scales must be uint8 \[3, 5, 2\]"),
    (dict(bias=torch.zeros(3, 4)), r"bias must be \[3, 5\]"),
    (dict(ids=torch.tensor([0, 3])), r"expert_ids must lie in \[0, 3\)"),
    (dict(ids=torch.tensor([0])), r"expert_ids must be integer \[2\]"),
])
def test_errors_name_the_argument(change, message):
    blocks, scales, bias = random_experts(3, 5, 64, seed=7)
    args = dict(x=torch.randn(2, 64), blocks=blocks, scales=scales, bias=bias, ids=torch.tensor([0, 2])) | change
    with pytest.raises(MXFP4Error, match=message):
        mxfp4_linear(args["x"], args["blocks"], args["scales"], args["bias"], args["ids"])
