"""MXFP4 kernels (gptoss.kernels): the C++ kernels and the pure-torch fallback against plain torch on the
reference dequantization; exact dequantize; argument errors."""

from __future__ import annotations

import pytest
import torch

from gptoss import kernels, mxfp4
from gptoss.errors import MXFP4Error
from gptoss.kernels import kernels_available, load_kernels, mxfp4_dequantize, mxfp4_linear

# The compiled path when this machine can build it; the fallback is always tested.
PATHS = [pytest.param(True, id="kernels"), pytest.param(False, id="torch")]


def needs_kernels(use_kernels: bool) -> None:
    if use_kernels and not kernels_available():
        pytest.skip("the C++ kernels could not be built here")


def make(E: int, N: int, K: int, seed: int = 0, scale_lo: int = 119, scale_hi: int = 136,
         bias_dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, ...]:
    """Random blocks (every byte value), scales in [scale_lo, scale_hi), bias or None."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(scale_lo, scale_hi, (E, N, K // 32), dtype=torch.uint8, generator=g)
    bias = None if bias_dtype is None else torch.randn(E, N, generator=g).to(bias_dtype)
    return blocks, scales, bias


def reference(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float64 from the reference dequantization, and the magnitude sum |x|·|W| + |bias| that
    bounds fp32 summation-order differences."""
    out, mag = [], []
    for m, e in enumerate(ids.tolist()):
        w = mxfp4.dequantize(blocks[e], scales[e], torch.float32).double()
        xm = x[m].double()
        b = bias[e].double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        out.append(xm @ w.T + b)
        mag.append(xm.abs() @ w.abs().T + b.abs())
    return torch.stack(out), torch.stack(mag)


def assert_close(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, rtol: float = 1e-5) -> None:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bound = rtol * mag + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds {rtol} of the magnitude sum (ratio {worst:.2f})"


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("E,N,K,M", [(1, 1, 32, 1), (3, 5, 64, 2), (5, 37, 96, 4), (3, 64, 320, 7),
                                     (5, 37, 320, 33), (1, 64, 96, 33), (3, 5, 2880, 4)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(use_kernels, E, N, K, M, x_dtype):
    needs_kernels(use_kernels)
    blocks, scales, bias = make(E, N, K, seed=E * 1000 + N * 10 + M)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    ids = torch.randint(0, E, (M,), generator=g)
    y = mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=use_kernels)
    assert_close(y, *reference(x, blocks, scales, bias, ids))


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [2, 0, 4, 1], [4, 4, 1, 4, 1, 4, 0, 4, 4, 4]],
                         ids=["all-one-expert", "distinct", "repeated"])
def test_linear_expert_routing_and_bias(use_kernels, bias_dtype, ids):
    """Rows sharing an expert (passes of up to 8, leftovers), distinct experts, bias in each dtype or none."""
    needs_kernels(use_kernels)
    blocks, scales, bias = make(5, 37, 128, seed=len(ids), bias_dtype=bias_dtype)
    ids = torch.tensor(ids)
    x = torch.randn(len(ids), 128, generator=torch.Generator().manual_seed(1))
    y = mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=use_kernels)
    assert_close(y, *reference(x, blocks, scales, bias, ids))
    # each row is independent of which other rows share its pass
    for m in (0, len(ids) - 1):
        alone = mxfp4_linear(x[m:m + 1], blocks, scales, bias, ids[m:m + 1], use_kernels=use_kernels)
        assert_close(alone, *reference(x[m:m + 1], blocks, scales, bias, ids[m:m + 1]))


@pytest.mark.parametrize("use_kernels", PATHS)
@pytest.mark.parametrize("scale_lo,scale_hi,x_exp", [(0, 24, 110), (230, 253, -110), (0, 253, 0)],
                         ids=["tiny-scales", "huge-scales", "full-range"])
def test_linear_extreme_scales(use_kernels, scale_lo, scale_hi, x_exp):
    """Scales far from 127 with activations scaled the other way, so outputs stay finite: 2^-127·value
    weights (fp32 denormals, exact) up to 6·2^125. Beyond scale 252 the reference's fp32 weights overflow
    (6·2^126 = 1.5·2^128), so those scales are left out."""
    needs_kernels(use_kernels)
    blocks, scales, bias = make(3, 37, 96, seed=scale_lo, scale_lo=scale_lo, scale_hi=scale_hi, bias_dtype=None)
    x = torch.ldexp(torch.randn(5, 96, generator=torch.Generator().manual_seed(2)), torch.tensor(float(x_exp)))
    if x_exp == 0:  # full range: one row per extreme, the rest zero so that no product overflows
        x = torch.zeros(5, 96)
        scales[0, :, :] = 1
        scales[1, :, :] = 252
        x[0], x[1] = 2.0 ** 100, 2.0 ** -100
    ids = torch.tensor([0, 1, 2, 1, 0])
    y = mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=use_kernels)
    ref, mag = reference(x, blocks, scales, bias, ids)
    assert torch.isfinite(y).all()
    assert_close(y, ref, mag)


@pytest.mark.parametrize("rows", [[3], [16], [17, 3], [64], [96, 2], [97], [130, 1, 4], [5, 40, 33]],
                         ids=lambda r: "-".join(map(str, r)))
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_amx_tiles_match_reference(rows, bias_dtype):
    """Where the CPU has AMX, experts with at least 3 bf16 rows run on tiles (1 to 6 tiles of 16 rows per pass,
    more rows than a pass holds, output rows not a multiple of 16; experts with fewer rows take the vector
    kernels in the same call): against the reference, and a NaN scale still makes its outputs NaN."""
    lib = load_kernels()
    if lib is None or not lib.amx():
        pytest.skip("no AMX tiles on this CPU (or no kernels)")
    E, N, K = len(rows), 37, 320
    blocks, scales, bias = make(E, N, K, seed=sum(rows), bias_dtype=bias_dtype)
    g = torch.Generator().manual_seed(len(rows))
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(rows)])[torch.randperm(sum(rows), generator=g)]
    x = torch.randn(sum(rows), K, generator=g).bfloat16()
    assert_close(mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=True), *reference(x, blocks, scales, bias, ids))
    scales[0, 20, 3] = 255
    y = mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=True)
    assert torch.isnan(y[ids == 0, 20]).all() and torch.isfinite(y[:, :20]).all()


def test_linear_scale_255_is_nan():
    """2^128 is no fp32 value (the OCP spec reads 0xFF as NaN): such a block makes its output NaN."""
    needs_kernels(True)
    blocks, scales, _ = make(1, 4, 64, bias_dtype=None)
    scales[0, 2, 1] = 255
    y = mxfp4_linear(torch.ones(1, 64), blocks, scales, None, torch.tensor([0]), use_kernels=True)
    assert torch.isnan(y[0, 2]) and torch.isfinite(y[0, [0, 1, 3]]).all()


@pytest.mark.parametrize("use_kernels", PATHS)
def test_linear_non_contiguous_and_other_dtypes(use_kernels):
    needs_kernels(use_kernels)
    blocks, scales, bias = make(3, 40, 128, seed=5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 6, generator=g).T  # [6, 128], non-contiguous
    ids = torch.tensor([2, 0, 2, 1, 1, 0, 0, 2, 2, 2, 2, 1], dtype=torch.int32)[::2]  # strided, int32
    b_nc = blocks.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    s_nc = scales.transpose(0, 1).contiguous().transpose(0, 1)
    bias_nc = bias.T.contiguous().T
    assert not (x.is_contiguous() or b_nc.is_contiguous() or s_nc.is_contiguous() or bias_nc.is_contiguous())
    ref = reference(x, blocks, scales, bias, ids.long())
    assert_close(mxfp4_linear(x, b_nc, s_nc, bias_nc, ids, use_kernels=use_kernels), *ref)
    # fp16 / fp64 inputs are converted to fp32 (fp64 loses its extra precision; the tolerance allows for it)
    assert_close(mxfp4_linear(x.double(), blocks, scales, bias.half(), ids, use_kernels=use_kernels),
                 *reference(x, blocks, scales, bias.half().float(), ids.long()))


@pytest.mark.parametrize("use_kernels", PATHS)
def test_linear_empty(use_kernels):
    needs_kernels(use_kernels)
    blocks, scales, bias = make(2, 5, 64)
    y = mxfp4_linear(torch.zeros(0, 64), blocks, scales, bias, torch.zeros(0, dtype=torch.long),
                     use_kernels=use_kernels)
    assert y.shape == (0, 5) and y.dtype == torch.float32


def test_kernels_and_fallback_agree_on_a_model_sized_step():
    """A decode step of the 20b MoE shape (K = 2880, 4 of 8 experts), both paths, bf16 activations and bias."""
    needs_kernels(True)
    blocks, scales, bias = make(8, 96, 2880, seed=9, bias_dtype=torch.bfloat16)
    x = torch.randn(4, 2880, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ids = torch.tensor([6, 1, 3, 0])
    ref = reference(x, blocks, scales, bias, ids)
    assert_close(mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=True), *ref)
    assert_close(mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=False), *ref)


def test_set_num_threads_gives_the_same_result():
    needs_kernels(True)
    blocks, scales, bias = make(3, 300, 256, seed=11)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([0, 2, 2, 1, 0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mxfp4_linear(x, blocks, scales, bias, ids)
        torch.set_num_threads(max(2, threads))
        many = mxfp4_linear(x, blocks, scales, bias, ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # rows are split between threads, never a dot product


# ---------------------------------------------------------------- dequantize
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_bit_exact_for_every_code_and_scale(dtype):
    """Every byte (so every pair of codes, ±0 included) under every scale 0..255: equal bits, and NaN
    where the reference has NaN (0·2^128; NaN payloads may differ)."""
    needs_kernels(True)
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16).repeat(256, 1, 1)  # [256 scales, 16 G, 16]
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).contiguous()
    ours, ref = mxfp4_dequantize(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype)
    assert ours.dtype == dtype and ours.shape == ref.shape == (256, 512)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(bits(ours)[~nan], bits(ref)[~nan])


@pytest.mark.parametrize("shape", [(1, 16), (3, 16), (2, 5, 7, 16), (1, 0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_shapes(shape, dtype):
    needs_kernels(True)
    g = torch.Generator().manual_seed(len(shape))
    blocks = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, shape[:-1], dtype=torch.uint8, generator=g)
    ours, ref = mxfp4_dequantize(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(bits(ours), bits(ref))
    # non-contiguous views of the same values
    if len(shape) >= 3 and shape[0] > 1:
        b_nc, s_nc = blocks.transpose(0, 1).contiguous().transpose(0, 1), scales.transpose(0, 1).contiguous().transpose(0, 1)
        assert torch.equal(bits(mxfp4_dequantize(b_nc, s_nc, dtype)), bits(ref))


def test_dequantize_errors_are_the_reference_ones():
    with pytest.raises(MXFP4Error, match="must be uint8"):
        mxfp4_dequantize(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(MXFP4Error, match="do not match"):
        mxfp4_dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------- errors and switches
def test_linear_errors_name_the_argument():
    blocks, scales, bias = make(3, 5, 64)
    x, ids = torch.randn(2, 64), torch.tensor([0, 2])
    cases = [
        (dict(blocks=blocks.float()), r"blocks must be uint8 \[E, N, K/32, 16\], got torch.float32 \[3, 5, 2, 16\]"),
        (dict(blocks=blocks[..., :8]), r"blocks must be uint8 \[E, N, K/32, 16\], got torch.uint8 \[3, 5, 2, 8\]"),
        (dict(blocks=blocks[0]), r"blocks must be uint8 \[E, N, K/32, 16\]"),
        (dict(scales=scales[:, :4]), r"scales must be uint8 \[E, N, K/32\] = \[3, 5, 2\] to match blocks"),
        (dict(scales=scales.to(torch.int32)), r"scales must be uint8"),
        (dict(x=torch.randn(2, 96)), r"x must be floating-point \[M, K\] with K = 32 \* 2 = 64"),
        (dict(x=torch.ones(2, 64, dtype=torch.long)), r"x must be floating-point"),
        (dict(x=torch.randn(64)), r"x must be floating-point \[M, K\]"),
        (dict(bias=bias[:2]), r"bias must be floating-point \[E, N\] = \[3, 5\] or None, got torch.float32 \[2, 5\]"),
        (dict(expert_ids=torch.tensor([0.0, 1.0])), r"expert_ids must be an integer tensor \[M\] = \[2\]"),
        (dict(expert_ids=torch.tensor([0, 1, 2])), r"expert_ids must be an integer tensor \[M\] = \[2\]"),
        (dict(expert_ids=torch.tensor([0, 3])), r"expert_ids must lie in \[0, E\) = \[0, 3\), got values from 0 to 3"),
        (dict(expert_ids=torch.tensor([-1, 0])), r"expert_ids must lie in \[0, E\) = \[0, 3\), got values from -1"),
    ]
    for use_kernels in (None, False):
        for change, message in cases:
            args = dict(x=x, blocks=blocks, scales=scales, bias=bias, expert_ids=ids) | change
            with pytest.raises(MXFP4Error, match="^mxfp4_linear: " + message):
                mxfp4_linear(**args, use_kernels=use_kernels)


def test_gptoss_kernels_0_forces_the_fallback(monkeypatch):
    blocks, scales, bias = make(3, 5, 64)
    x, ids = torch.randn(2, 64), torch.tensor([0, 2])
    monkeypatch.setenv("GPTOSS_KERNELS", "0")
    assert load_kernels() is None and not kernels_available()
    with pytest.raises(MXFP4Error, match="mxfp4_linear: the compiled kernels are not available"):
        mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=True)
    assert_close(mxfp4_linear(x, blocks, scales, bias, ids), *reference(x, blocks, scales, bias, ids))
    assert torch.equal(mxfp4_dequantize(blocks, scales), mxfp4.dequantize(blocks, scales))
    monkeypatch.setenv("GPTOSS_KERNELS", "1")  # read at call time, not at import
    assert kernels_available() == (kernels._build() is not None)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'x':\nc++: error: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("GPTOSS_KERNELS", "1")
    kernels._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not be built \(c\+\+: error: command not found\)") as caught:
            assert load_kernels() is None
            blocks, scales, bias = make(2, 3, 32)
            x, ids = torch.randn(1, 32), torch.tensor([1])
            assert_close(mxfp4_linear(x, blocks, scales, bias, ids), *reference(x, blocks, scales, bias, ids))
            assert load_kernels() is None
        assert len([w for w in caught if "could not be built" in str(w.message)]) == 1
    finally:
        kernels._build.cache_clear()  # the next caller builds (or loads the cached build) again


@pytest.mark.parametrize("march,simd,experts", [
    ("-march=x86-64", "scalar", "scalar"),
    ("-march=native -mno-avx512f", "avx2", "vpshufb"),
    ("-march=native -DGPTOSS_EXPERTS_DP=1", "avx512bf16", "vdpbf16ps"),
    ("-march=native -DGPTOSS_EXPERTS_DP=0", "avx512bf16", "vpermps"),
], ids=["scalar", "avx2", "avx512-vdpbf16ps", "avx512-vpermps"])
def test_other_instruction_sets_match(tmp_path, monkeypatch, march, simd, experts):
    """The builds other CPUs get, built here too: portable C++ (no AVX2), the AVX2 + FMA path (AVX-512 off)
    and, on a CPU with AVX-512 BF16, both expert kernels for bf16 activations (AMD's pick and Intel's), so
    each is checked whatever the test machine's best path is."""
    needs_kernels(True)
    from torch.utils import cpp_extension

    best = kernels.load_kernels().simd()
    if (simd == "avx2" and best == "scalar") or (simd == "avx512bf16" and best != "avx512bf16"):
        pytest.skip(f"this CPU has no {simd}")
    lib = cpp_extension.load(name=f"gptoss_mxfp4_cpu_{experts}_test", sources=[str(kernels._SOURCE)],
                             extra_cflags=["-O1", *march.split(), "-fopenmp"], extra_ldflags=["-fopenmp"],
                             build_directory=str(tmp_path), verbose=False)
    assert (lib.simd(), lib.experts_kernel()) == (simd, experts)
    monkeypatch.setattr(kernels, "_build", lambda: lib)
    blocks, scales, bias = make(5, 37, 320, seed=13, bias_dtype=torch.bfloat16)
    x = torch.randn(11, 320, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    ids = torch.tensor([4, 0, 4, 4, 2, 1, 4, 4, 4, 4, 4])
    assert_close(mxfp4_linear(x, blocks, scales, bias, ids, use_kernels=True), *reference(x, blocks, scales, bias, ids))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(bits(mxfp4_dequantize(blocks, scales, dtype, use_kernels=True)),
                           bits(mxfp4.dequantize(blocks, scales, dtype)))
    check_bf16_linear(3, 70, 45, torch.bfloat16)
    test_int8_linear_matches_fp64(3, 70, 45, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        check_swiglu(dtype, rows=3, pairs=45)
    check_fused_decode(monkeypatch, torch.bfloat16)  # last: it leaves GPTOSS_KERNELS=0 set


# ---------------------------------------------------------------- SwiGLU (prefill experts)
def check_swiglu(dtype: torch.dtype, rows: int, pairs: int) -> None:
    """kernels.swiglu = model.swiglu in fp64, rounded once: fp32 within the vector exp's few ulp, bf16 the
    correctly rounded value or its neighbour; clamps on both sides, tails past the vectors, NaN kept."""
    from gptoss.model import swiglu

    g = torch.Generator().manual_seed(rows * 100 + pairs)
    h = 6 * torch.randn(rows, 2 * pairs, generator=g)  # |gate|, |linear| often past the limit of 7
    h[0, :6] = torch.tensor([float("nan"), 1.0, 1.0, float("nan"), -200.0, 3.0])  # −200: σ underflows to 0
    h = h.to(dtype)
    ours = kernels.swiglu(h, 1.702, 7.0)
    exact = swiglu(h.double(), 1.702, 7.0)
    assert ours.dtype == dtype and ours.shape == (rows, pairs)
    assert torch.equal(ours.isnan(), exact.isnan()) and ours[0, 0].isnan() and ours[0, 1].isnan()
    assert ours[0, 2] == 0
    ours, exact = ours.double().nan_to_num(), exact.nan_to_num()
    if dtype == torch.float32:
        assert ((ours - exact).abs() <= 1e-6 * (exact.abs() + 1e-3)).all()
    else:  # the correctly rounded value or at most one bf16 step (2^-7 of it) away, mostly the former
        rounded = exact.to(dtype).double()
        assert ((ours - rounded).abs() <= rounded.abs() * 2 ** -7).all()
        assert (ours == rounded).double().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,pairs", [(1, 7), (2, 8), (5, 2880), (33, 129)])
def test_swiglu_matches_the_definition(dtype, rows, pairs):
    needs_kernels(True)
    check_swiglu(dtype, rows, pairs)


def test_swiglu_kernel_declines_autograd_and_odd_widths():
    needs_kernels(True)
    h = torch.randn(4, 10, requires_grad=True)
    assert kernels.swiglu(h, 1.702, 7.0) is None  # model.swiglu keeps the graph
    with torch.no_grad():
        assert kernels.swiglu(h, 1.702, 7.0) is not None
    assert kernels.swiglu(torch.randn(4, 9), 1.702, 7.0) is None


# ---------------------------------------------------------------- bf16 linear (attention, router, unembedding)
def check_bf16_linear(M: int, K: int, N: int, bias_dtype: torch.dtype | None, x_dtype=torch.bfloat16) -> None:
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    b = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    y = kernels.bf16_linear(x, w, b)
    # the reference in fp64: the kernel's only difference from fp32 F.linear is the order of fp32 additions
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    mag = (x.double().abs() @ w.double().abs().T).amax() + 1
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert (y.double() - ref).abs().max() <= 1e-5 * mag


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("K,N", [(2880, 64), (4096, 129), (7, 3), (31, 200)], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32], ids=str)
def test_bf16_linear_matches_fp64(M, K, N, bias_dtype):
    check_bf16_linear(M, K, N, bias_dtype)


def test_bf16_linear_fp32_input_and_errors():
    check_bf16_linear(2, 96, 33, torch.bfloat16, x_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"same K"):
        kernels.bf16_linear(torch.zeros(1, 8), torch.zeros(4, 9, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[4\]"):
        kernels.bf16_linear(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(5))


# ---------------------------------------------------------------- int8 rows (the opt-in unembedding)
@pytest.mark.parametrize("M", [1, 2, 4, 5])
@pytest.mark.parametrize("K,N", [(2880, 64), (100, 129), (7, 3), (47, 200)], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_linear_matches_fp64(M, K, N, x_dtype):
    """Kernel (≤ 4 rows) and torch path (5 rows) against x @ (q · scale).T in fp64."""
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    y = kernels.int8_linear(x, q, scale)
    w = q.double() * scale.double()[:, None]
    ref, mag = x.double() @ w.T, x.double().abs() @ w.abs().T
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert ((y.double() - ref).abs() <= 1e-5 * mag + 1e-30).all()


def test_int8_linear_errors():
    with pytest.raises(ValueError, match=r"weight int8 \[N, K\]"):
        kernels.int8_linear(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4))
    with pytest.raises(ValueError, match=r"scale must be float32 \[N\] = \[4\]"):
        kernels.int8_linear(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.zeros(5))


def test_int8_unembedding_error_within_its_bound():
    """Transformer.quantize_unembedding: per-row int8, so each logit moves by at most Σ|h| · scale / 2; the
    model still decodes (cache path, kernels) to logits within that bound of the bf16 model's."""
    from gptoss import synthetic
    from gptoss.config import preset
    from gptoss.model import Int8Linear, Transformer

    config = preset("tiny")
    model = Transformer(config, dtype=torch.bfloat16)
    model.load_state_dict(dict(synthetic.random_tensors(config, seed=4)), strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = model.hidden_states(tokens)
        before = model(tokens)
        w = model.unembedding.weight.float()
        model.quantize_unembedding()
        assert isinstance(model.unembedding, Int8Linear) and model.unembedding.weight_int8.dtype == torch.int8
        deq = model.unembedding.weight_int8.float() * model.unembedding.scale[:, None]
        assert ((deq - w).abs() <= model.unembedding.scale[:, None] / 2 * (1 + 1e-5)).all()  # ties: exactly s/2
        after = model(tokens)
        bound = h.float().abs() @ (model.unembedding.scale[:, None] / 2).expand_as(w).T  # (B, T, V)
        assert ((after - before).abs() <= bound * 1.01 + 1e-4).all()
        assert (after - before).abs().max() > 0  # it did change something


def test_model_decode_with_bf16_kernel_matches_plain_torch(monkeypatch):
    """A bf16 decode step through gptoss.model.Linear equals the same model with the kernel off (fp32 sums)."""
    from gptoss import synthetic
    from gptoss.config import preset
    from gptoss.model import Transformer

    needs_kernels(True)
    config = preset("tiny")
    model = Transformer(config, dtype=torch.bfloat16)
    model.load_state_dict(dict(synthetic.random_tensors(config, seed=3)), strict=True)
    tokens = torch.tensor([[5, 17, 99, 300]])
    calls = []
    real = kernels.bf16_linear
    monkeypatch.setattr(kernels, "bf16_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fast = model(tokens).float()  # 4 rows: within BF16_MAX_ROWS, so every Linear takes the kernel
        assert len(calls) == 3 * config.num_hidden_layers + 1  # qkv, out, router per block + unembedding
        monkeypatch.setattr(kernels, "BF16_MAX_ROWS", 0)
        plain = model(tokens).float()
    assert len(calls) == 3 * config.num_hidden_layers + 1
    # bf16 activations between layers: the two paths differ by bf16 rounding of fp32 sums taken in another order
    assert (fast - plain).abs().max() <= 0.02 * plain.abs().max()


# ---------------------------------------------------------------- fused decode steps (model.Block / Attention)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_decode_matches_the_torch_path(monkeypatch, dtype):
    """Decoding with the fused kernels (bf16: Block._decode_fused; fp32: Attention._decode_fused + the MoE in
    one call) gives the logits of the plain torch code, step by step, for two rows at different positions
    (left padding) over three sliding windows (the ring buffer wraps), and the same greedy tokens."""
    needs_kernels(True)
    check_fused_decode(monkeypatch, dtype)


def check_fused_decode(monkeypatch, dtype: torch.dtype) -> None:
    from gptoss import synthetic
    from gptoss.cache import KVCache, default_cache_dtype
    from gptoss.config import preset
    from gptoss.model import Transformer

    config = preset("tiny")  # sliding window 8, 4 layers, 8 experts
    model = Transformer(config, dtype=dtype)
    model.load_state_dict(dict(synthetic.random_tensors(config, seed=11)), strict=True)
    calls = {"block": 0, "attention": 0, "moe": 0}
    def counted(real, key):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            calls[key] += out is not None  # None: the kernels are off, the caller runs its torch code
            return out
        return call

    for name, key in (("decode_attention_block", "block"), ("decode_attention", "attention"), ("moe_experts", "moe")):
        monkeypatch.setattr(kernels, name, counted(getattr(kernels, name), key))
    prompt = torch.tensor([[0, 5, 17, 99, 300, 7], [3, 1, 4, 1, 5, 9]])
    positions = torch.tensor([[-1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]])  # row 0 left-padded by one

    def run(fused: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
        monkeypatch.setenv("GPTOSS_KERNELS", "1" if fused else "0")
        cache = KVCache(config, 2, max_len=64, dtype=default_cache_dtype(dtype, "cpu"))
        with torch.no_grad():
            logits = model(prompt, positions, cache, last_only=True)
            pos = positions[:, -1:] + 1
            steps, tokens = [], []
            for _ in range(3 * config.sliding_window):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token.flatten().tolist())
                logits = model(token, pos, cache)
                steps.append(logits.float())
                pos = pos + 1
        return steps, tokens

    fused, fused_tokens = run(True)
    used = dict(calls)
    plain, plain_tokens = run(False)
    assert calls == used  # the second run never reached the kernels
    n = 3 * config.sliding_window * config.num_hidden_layers
    layers = config.num_hidden_layers  # + the prefill, whose few rows also take the one-call MoE
    if dtype == torch.bfloat16:  # every decode step of every block took the fused path
        assert used == {"block": n, "attention": 0, "moe": n + layers}
    else:
        assert used == {"block": 0, "attention": n, "moe": n + layers}
    # fp32: the order of additions only; bf16: that, plus bf16 roundings of sums taken in another order
    tol = 2e-5 if dtype == torch.float32 else 0.03
    for f, p in zip(fused, plain):
        assert (f - p).abs().max() <= tol * p.abs().max()
    if dtype == torch.float32:
        assert fused_tokens == plain_tokens


@pytest.mark.parametrize("window", [None, 16], ids=["full", "sliding"])
@pytest.mark.parametrize("with_sinks", [True, False], ids=["sinks", "no-sinks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("Dh", [64, 16, 72], ids=lambda d: f"Dh{d}")  # 72: value columns in 64 + 8
def test_decode_attention_matches_rope_and_sdpa(window, with_sinks, dtype, Dh):
    """kernels.decode_attention (GPT-oss's 8 query heads per kv head: the head-vectorised path) against
    model.apply_rope + model.sdpa_with_sinks on the same cache: two rows at different positions, each writing
    its own slot (the engine's rows), a third cache row the call must not touch, empty slots, a window, sinks
    or none; each new key lands in its row's slot."""
    from gptoss.model import apply_rope, attention_mask, rope_cos_sin, sdpa_with_sinks

    needs_kernels(True)
    B, H, K, S = 2, 16, 2, 300
    slots = torch.tensor([257, 283])
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, 1, (H + 2 * K) * Dh, generator=g).to(dtype)
    cache_k = torch.randn(B + 1, S, K, Dh, generator=g)
    cache_v = torch.randn(B + 1, S, K, Dh, generator=g)
    positions = torch.tensor([[290], [270]])
    cache_pos = torch.arange(S).repeat(B + 1, 1)
    cache_pos[:, 280:] = -1  # not written yet
    cache_pos[1, :5] = -1
    sinks = torch.randn(H, generator=g) if with_sinks else None
    inv_freq = 1.0 / (150000 ** (torch.arange(0, Dh, 2).float() / Dh))
    cos, sin = rope_cos_sin(positions, inv_freq, 1.2)
    k_ref, v_ref, pos_ref = cache_k.clone(), cache_v.clone(), cache_pos.clone()
    out = kernels.decode_attention(qkv, H, K, Dh, cos, sin, cache_k, cache_v, cache_pos, slots, positions, window,
                                   sinks)
    q, k, v = qkv.split([H * Dh, K * Dh, K * Dh], dim=-1)
    q, k = apply_rope(q.view(B, 1, H, Dh), cos, sin), apply_rope(k.view(B, 1, K, Dh), cos, sin)
    rows = torch.arange(B)
    k_ref[rows, slots], v_ref[rows, slots] = k[:, 0].float(), v.view(B, K, Dh).float()
    pos_ref[rows, slots] = positions[:, 0]
    assert torch.equal(cache_v, v_ref) and torch.equal(cache_pos, pos_ref)
    assert torch.allclose(cache_k, k_ref, rtol=1e-6, atol=1e-6)  # RoPE: the compiler may fuse a·b − c·d (FMA)
    k_ref, v_ref, pos_ref = k_ref[:B], v_ref[:B], pos_ref[:B]
    mask = attention_mask(positions, pos_ref, window)
    ref = sdpa_with_sinks(q.view(B, 1, K, H // K, Dh), k_ref, v_ref, sinks, mask)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding of sums taken in another order
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
