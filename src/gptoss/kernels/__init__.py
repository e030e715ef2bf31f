"""MXFP4 CPU kernels: a C++ extension built on first use (torch.utils.cpp_extension + the machine's compiler,
-O3 -march=native, cached under ~/.cache/torch_extensions), with an exact pure-torch fallback.

    mxfp4_linear(x, blocks, scales, bias, expert_ids)  row m of x times expert expert_ids[m] (decode path)
    mxfp4_dequantize(blocks, scales, dtype)            whole tensors (prefill path: one expert, then a GEMM)
    bf16_linear(x, weight, bias, out_dtype)            a bf16 nn.Linear for ≤ BF16_MAX_ROWS rows (decode)
    int8_linear(x, weight, scale)                      the same for int8 rows with fp32 scales (opt-in unembedding)
    rmsnorm / swiglu / decode_attention / moe_experts / decode_attention_block
                                                       fused steps that model.py calls (below)

Instruction sets, chosen at build time by -march=native (`load_kernels().simd()` says which): AVX-512 BF16,
AVX2 + FMA, or portable C++. On AVX-512 the expert kernel for bf16 activations is chosen per CPU at load
(`load_kernels().experts_kernel()`): vdpbf16ps on AMD (Zen 4 issues it every cycle), an fp32 table lookup
(vpermps) with FMAs elsewhere (the Intel Xeon measured issues vdpbf16ps every other cycle). Either way the
products are exact and the sums fp32; only the summation order differs from dequantize-then-matmul. Where
the build finds AMX (Intel Sapphire Rapids and later) and Linux grants it, experts with at least 3 bf16 rows in
one call multiply on AMX tiles instead (`load_kernels().amx()`): short prompts and batched decode.

GPTOSS_KERNELS=0 forces the fallback (read on every call); GPTOSS_KERNELS_VERBOSE=1 shows the build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .. import mxfp4
from ..errors import MXFP4Error

_SOURCE = Path(__file__).with_name("mxfp4_cpu.cpp")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # what the C++ side reads natively


def _machine_tag() -> str:
    """A short hash of the CPU and torch: -march=native code must not be reused on another machine."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()}|{cpu}|{torch.__version__}".encode()).hexdigest()[:10]


def _short_reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "not found" in line.lower()]
    reason = (errors[-1] if errors else lines[0]) if lines else type(e).__name__
    return reason[:200]


@functools.lru_cache(maxsize=1)
def _build() -> ModuleType | None:
    try:
        from torch.utils import cpp_extension

        # -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially without it; the
        # extension then shares torch's libgomp, so torch.set_num_threads applies.
        return cpp_extension.load(name=f"gptoss_mxfp4_cpu_{_machine_tag()}", sources=[str(_SOURCE)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                  verbose=os.environ.get("GPTOSS_KERNELS_VERBOSE", "0") == "1")
    except Exception as e:  # no compiler, no headers, a build error: the fallback still gives exact results
        warnings.warn(f"gptoss: the MXFP4 CPU kernels could not be built ({_short_reason(e)}); using the "
                      "slower pure-torch path", RuntimeWarning, stacklevel=4)
        return None


def load_kernels() -> ModuleType | None:
    """The compiled kernels (built on the first call, then cached), or None when GPTOSS_KERNELS=0 or the
    build failed (one warning)."""
    if os.environ.get("GPTOSS_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return _build()


def kernels_available() -> bool:
    """Whether mxfp4_linear / mxfp4_dequantize run the compiled kernels here."""
    return load_kernels() is not None


def amx_tiles() -> bool:
    """Whether the fused expert kernel multiplies bf16 rows on AMX tiles here (an AMX CPU, a kernel build for
    it, and Linux's permission; decides model.fused_experts_fit's bound)."""
    lib = load_kernels()
    return lib is not None and lib.amx()


def _select(use_kernels: bool | None, device: torch.device, fn: str) -> ModuleType | None:
    """use_kernels None: the kernels when available; False: pure torch; True: the kernels or an error."""
    if use_kernels is False:
        return None
    lib = load_kernels() if device.type == "cpu" else None
    if use_kernels and lib is None:
        raise MXFP4Error(f"{fn}: the compiled kernels are not available (GPTOSS_KERNELS=0, a non-CPU tensor, "
                         "or the build failed)")
    return lib


def _shape(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}"


def _check_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  expert_ids: torch.Tensor) -> None:
    fn = "mxfp4_linear"
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != mxfp4.BYTES_PER_BLOCK:
        raise MXFP4Error(f"{fn}: blocks must be uint8 [E, N, K/32, {mxfp4.BYTES_PER_BLOCK}], got {_shape(blocks)}")
    E, N, G = blocks.shape[:3]
    if scales.dtype != torch.uint8 or scales.shape != blocks.shape[:3]:
        raise MXFP4Error(f"{fn}: scales must be uint8 [E, N, K/32] = {[E, N, G]} to match blocks, got "
                         f"{_shape(scales)}")
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] != G * mxfp4.BLOCK:
        raise MXFP4Error(f"{fn}: x must be floating-point [M, K] with K = 32 * {G} = {G * mxfp4.BLOCK} (the "
                         f"blocks' K/32 = {G}), got {_shape(x)}")
    if bias is not None and (not bias.is_floating_point() or bias.shape != (E, N)):
        raise MXFP4Error(f"{fn}: bias must be floating-point [E, N] = {[E, N]} or None, got {_shape(bias)}")
    if expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0] or expert_ids.is_floating_point() \
            or expert_ids.dtype == torch.bool or expert_ids.is_complex():
        raise MXFP4Error(f"{fn}: expert_ids must be an integer tensor [M] = [{x.shape[0]}] (one per row of x), "
                         f"got {_shape(expert_ids)}")
    devices = {t.device for t in (x, blocks, scales, expert_ids, bias) if t is not None}
    if len(devices) > 1:
        raise MXFP4Error(f"{fn}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if expert_ids.numel():
        if expert_ids.numel() <= 1024:  # decode-sized: a list is cheaper than two tensor reductions
            ids = expert_ids.tolist()
            lo, hi = min(ids), max(ids)
        else:
            lo, hi = map(int, torch.aminmax(expert_ids))
        if lo < 0 or hi >= E:
            raise MXFP4Error(f"{fn}: expert_ids must lie in [0, E) = [0, {E}), got values from {lo} to {hi}")


@torch.no_grad()
def _linear_torch(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  ids: torch.Tensor) -> torch.Tensor:
    """The fallback: rows grouped by expert, one expert dequantized (fp32, exact) at a time, one matmul each."""
    x32 = x.float()
    out = torch.empty(x.shape[0], blocks.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero(as_tuple=True)[0]
        y = x32[rows] @ mxfp4.dequantize(blocks[e], scales[e], torch.float32).T
        out[rows] = y + bias[e].float() if bias is not None else y
    return out


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 expert_ids: torch.Tensor, use_kernels: bool | None = None) -> torch.Tensor:
    """out[m] = x[m] @ W[expert_ids[m]].T + bias[expert_ids[m]] as fp32 [M, N], W = dequantize(blocks, scales).

    x [M, K] floating (fp32/bf16 natively), blocks [E, N, K/32, 16] uint8, scales [E, N, K/32] uint8,
    bias [E, N] floating or None, expert_ids [M] integer. Accumulates in fp32 with fp32 activations, so it
    matches `x.float() @ W.T + bias` up to summation order. The kernel reads each selected expert's 4-bit
    bytes once per call (rows sharing an expert share the pass, up to 8 at a time) and never writes a
    dequantized copy. A block scale of 255 (NaN in the OCP spec) gives NaN.
    use_kernels: None = the kernels when available, False = the pure-torch path, True = the kernels or raise.
    """
    _check_linear(x, blocks, scales, bias, expert_ids)
    lib = _select(use_kernels, x.device, "mxfp4_linear")
    if lib is None:
        return _linear_torch(x, blocks, scales, bias, expert_ids)
    M, K, (E, N) = x.shape[0], x.shape[1], blocks.shape[:2]
    out = torch.empty(M, N, dtype=torch.float32)
    if M == 0 or N == 0:
        return out
    x = (x if x.dtype in _DTYPE_CODES else x.float()).contiguous()
    if bias is not None:
        bias = (bias if bias.dtype in _DTYPE_CODES else bias.float()).contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    ids = (expert_ids if expert_ids.dtype == torch.int64 else expert_ids.long()).contiguous()
    lib.linear(x.data_ptr(), _DTYPE_CODES[x.dtype], M, K, blocks.data_ptr(), scales.data_ptr(), E, N,
               0 if bias is None else bias.data_ptr(), 0 if bias is None else _DTYPE_CODES[bias.dtype],
               ids.data_ptr(), out.data_ptr())
    return out


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                     use_kernels: bool | None = None) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 → [..., G*32] in `dtype`; equal, bit for bit, to
    gptoss.mxfp4.dequantize (NaN payloads aside), several times faster on CPU for fp32 and bf16."""
    lib = _select(use_kernels, blocks.device, "mxfp4_dequantize")
    if lib is None or dtype not in _DTYPE_CODES or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 \
            or blocks.dim() < 2 or blocks.shape[-1] != mxfp4.BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        return mxfp4.dequantize(blocks, scales, dtype)  # other dtypes, and the descriptive shape errors
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * mxfp4.BLOCK, dtype=dtype)
    if out.numel():
        blocks, scales = blocks.contiguous(), scales.contiguous()
        lib.dequantize(blocks.data_ptr(), scales.data_ptr(), scales.numel(), out.data_ptr(), _DTYPE_CODES[dtype])
    return out


BF16_MAX_ROWS = 4  # beyond a few rows torch's GEMM reuses each weight load better than this streaming kernel


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [M, K] floating, weight [N, K] bf16, bias [N] or None → [M, N] = x.float() @ weight.T + bias, equal
    to F.linear in fp32 up to summation order, returned in out_dtype (fp32, or bf16 rounded to nearest even
    as `.to(torch.bfloat16)` would). Streams the weight once for all M rows (decode); falls back to torch off
    CPU, for more than BF16_MAX_ROWS rows, or without the compiled kernels."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"bf16_linear: x must be [M, K] and weight [N, K] with the same K, got "
                         f"{_shape(x)} and {_shape(weight)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bf16_linear: bias must be [N] = [{weight.shape[0]}], got {_shape(bias)}")
    lib = load_kernels() if x.device.type == "cpu" and weight.device.type == "cpu" else None
    if lib is None or weight.dtype != torch.bfloat16 or x.shape[0] > BF16_MAX_ROWS or out_dtype not in _DTYPE_CODES:
        y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(out_dtype)
    M, K, N = x.shape[0], x.shape[1], weight.shape[0]
    out = torch.empty(M, N, dtype=out_dtype)
    if out.numel() == 0:
        return out
    x = (x if x.dtype in _DTYPE_CODES else x.float()).contiguous()
    weight = weight.contiguous()
    if bias is not None:
        bias = (bias if bias.dtype in _DTYPE_CODES else bias.float()).contiguous()
    lib.bf16_linear(x.data_ptr(), _DTYPE_CODES[x.dtype], M, K, weight.data_ptr(), N,
                    0 if bias is None else bias.data_ptr(), 0 if bias is None else _DTYPE_CODES[bias.dtype],
                    out.data_ptr(), _DTYPE_CODES[out_dtype])
    return out


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """weight [N, K] bf16 on CPU → (q int8 [N, K], scale [N], ‖w − q·scale‖₂ [N], ‖w‖₂ [N]) fp32, the rows quantized
    as model.Int8Linear.from_linear does (scale = max|row| / 127, round half to even), in one pass; None without
    the compiled kernels or for another weight (the caller then uses torch)."""
    lib = load_kernels() if weight.device.type == "cpu" else None
    if lib is None or weight.dim() != 2 or weight.dtype != torch.bfloat16:
        return None
    weight = weight.contiguous()
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8)
    scale, err, norm = (torch.empty(N, dtype=torch.float32) for _ in range(3))
    lib.quantize_rows_int8(weight.data_ptr(), N, K, q.data_ptr(), scale.data_ptr(), err.data_ptr(), norm.data_ptr())
    return q, scale, err, norm


def int8_bounds(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, row_bound: torch.Tensor,
                h_norm: torch.Tensor, temperature: torch.Tensor | None = None, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """model.BoundedArgmax's bounds in one pass over the int8 rows (see there): x [M, K] (M ≤ BF16_MAX_ROWS),
    weight int8 [N, K], scale and row_bound fp32 [N], h_norm fp32 [M]; temperature fp32 [M] (0 = greedy row)
    and noise fp32 [M, N] or None. → (hi [M, N], each row's largest lo [M], whether all were finite); None
    without the compiled kernels (the caller then takes all logits)."""
    lib = load_kernels() if x.device.type == "cpu" and weight.device.type == "cpu" else None
    if lib is None or x.dim() != 2 or x.shape[0] > BF16_MAX_ROWS or x.dtype not in _DTYPE_CODES:
        return None
    M, K, N = x.shape[0], x.shape[1], weight.shape[0]
    hi = torch.empty(M, N, dtype=torch.float32)
    max_lo = torch.empty(M, dtype=torch.float32)
    x, weight = x.contiguous(), weight.contiguous()
    h_norm = h_norm.float().contiguous()
    if temperature is not None:
        temperature, noise = temperature.float().contiguous(), noise.float().contiguous()
    finite = lib.int8_bounds(x.data_ptr(), _DTYPE_CODES[x.dtype], M, K, weight.data_ptr(), scale.data_ptr(),
                             row_bound.data_ptr(), N, h_norm.data_ptr(),
                             0 if temperature is None else temperature.data_ptr(),
                             0 if noise is None else noise.data_ptr(), hi.data_ptr(), max_lo.data_ptr())
    return hi, max_lo, bool(finite)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] floating, weight [N, K] int8, scale [N] fp32 → [M, N] fp32 = x @ (weight · scale[:, None]).T,
    up to the order of fp32 additions (the scale multiplies each row's sum). Streams the weight once for all
    rows; torch (in row chunks, never a whole fp32 copy) off CPU, for more than BF16_MAX_ROWS rows, or
    without the compiled kernels."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or weight.dtype != torch.int8:
        raise ValueError(f"int8_linear: x must be [M, K] and weight int8 [N, K] with the same K, got "
                         f"{_shape(x)} and {_shape(weight)}")
    if scale.shape != (weight.shape[0],) or scale.dtype != torch.float32:
        raise ValueError(f"int8_linear: scale must be float32 [N] = [{weight.shape[0]}], got {_shape(scale)}")
    lib = load_kernels() if x.device.type == "cpu" and weight.device.type == "cpu" else None
    if lib is None or x.shape[0] > BF16_MAX_ROWS or x.dtype not in _DTYPE_CODES:
        x32 = x.float()
        out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
        chunk = 16384  # rows of fp32 weight at a time (≈ 190 MB at K 2880)
        for n0 in range(0, weight.shape[0], chunk):
            w = weight[n0:n0 + chunk].float() * scale[n0:n0 + chunk, None]
            out[:, n0:n0 + chunk] = x32 @ w.T
        return out
    M, K, N = x.shape[0], x.shape[1], weight.shape[0]
    out = torch.empty(M, N, dtype=torch.float32)
    if out.numel():
        x, weight, scale = x.contiguous(), weight.contiguous(), scale.contiguous()
        lib.int8_linear(x.data_ptr(), _DTYPE_CODES[x.dtype], M, K, weight.data_ptr(), scale.data_ptr(), N,
                        out.data_ptr())
    return out


# ---------------------------------------------------------------- fused decode steps (model.py's fast path)
# Internal: the model calls these only with tensors it built itself (shapes and dtypes as documented), on
# CPU, without autograd; each returns None when the compiled kernels are not there, and the caller then
# runs its torch code.
FUSED_MAX_ROWS = 64  # rmsnorm runs on one thread: beyond a few rows torch's parallel ops are faster


def rmsnorm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., D] fp32/bf16, scale [D] fp32 → RMSNorm in fp32 math, in x's dtype (model.RMSNorm)."""
    lib = load_kernels()
    if lib is None or x.dtype not in _DTYPE_CODES or scale.dtype != torch.float32:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.rmsnorm(x.data_ptr(), _DTYPE_CODES[x.dtype], x.numel() // x.shape[-1], x.shape[-1],
                scale.contiguous().data_ptr(), float(eps), out.data_ptr())
    return out


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor | None:
    """h [..., 2I] fp32/bf16 (gate, linear interleaved) → [..., I] in h's dtype: model.swiglu in one pass of
    fp32 math (torch's bf16 ops round after each of six steps and allocate each); None where not applicable
    (no kernels, not CPU, or autograd needs the graph)."""
    lib = load_kernels() if h.device.type == "cpu" else None
    if (lib is None or h.dtype not in _DTYPE_CODES or h.shape[-1] % 2
            or (torch.is_grad_enabled() and h.requires_grad)):
        return None
    h = h.contiguous()
    out = h.new_empty(h.shape[:-1] + (h.shape[-1] // 2,))
    code = _DTYPE_CODES[h.dtype]
    lib.swiglu(h.data_ptr(), code, out.numel(), float(alpha), float(limit), out.data_ptr(), code)
    return out


def decode_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                     sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, cache_pos: torch.Tensor,
                     slots: torch.Tensor, positions: torch.Tensor, sliding_window: int | None,
                     sinks: torch.Tensor | None) -> torch.Tensor | None:
    """One new token per row: RoPE on q and k, row b's k/v written to cache slot slots[b], attention with sinks.

    qkv [B, 1, (H + 2K)·Dh] fp32/bf16; cos/sin [B, 1, 1, Dh/2] fp32; cache_k/v [≥B, S, K, Dh] fp32 (written in
    place, contiguous; rows beyond B untouched), cache_pos [≥B, S] int64 (written); slots [B] int64;
    positions [B, 1] int64 → [B, 1, H·Dh] in qkv's dtype."""
    lib = load_kernels()
    if lib is None or qkv.dtype not in _DTYPE_CODES or cache_k.dtype != torch.float32:
        return None
    B, S = qkv.shape[0], cache_pos.shape[1]
    qkv = qkv.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q_pos = positions.reshape(B).long().contiguous()
    slots = slots.long().contiguous()
    sinks = None if sinks is None else sinks.float().contiguous()
    out = torch.empty(B, 1, num_heads * head_dim, dtype=qkv.dtype)
    lib.decode_attention(qkv.data_ptr(), _DTYPE_CODES[qkv.dtype], B, num_heads, num_kv_heads, head_dim,
                         cos.data_ptr(), sin.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), cache_pos.data_ptr(),
                         S, slots.data_ptr(), q_pos.data_ptr(), sliding_window or 0, 0 if sinks is None else sinks.data_ptr(),
                         out.data_ptr())
    return out


def moe_experts(t: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, blocks1: torch.Tensor,
                scales1: torch.Tensor, bias1: torch.Tensor, blocks2: torch.Tensor, scales2: torch.Tensor,
                bias2: torch.Tensor, alpha: float, limit: float,
                residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """t [N, D] fp32/bf16 through experts [N, k] weighted by weights [N, k]: mlp1, clamped SwiGLU (rounded
    to t's dtype), mlp2, the weighted sum → [N, D] fp32 (model.MoE._fused in one call). With `residual`
    [N, D] (t's dtype): residual + that sum rounded to t's dtype, in t's dtype (the MoE block's output)."""
    lib = load_kernels()
    if lib is None or t.dtype not in _DTYPE_CODES or bias1.dtype not in _DTYPE_CODES or bias2.dtype != bias1.dtype:
        return None
    (N, D), k = t.shape, experts.shape[1]
    E, I2 = blocks1.shape[:2]
    t, experts, weights = t.contiguous(), experts.long().contiguous(), weights.float().contiguous()
    blocks1, scales1, blocks2, scales2 = (w.contiguous() for w in (blocks1, scales1, blocks2, scales2))
    bias1, bias2 = bias1.contiguous(), bias2.contiguous()
    if residual is not None:
        residual = residual.to(t.dtype).contiguous()
    out = torch.empty(N, blocks2.shape[1], dtype=torch.float32 if residual is None else t.dtype)
    lib.moe_experts(t.data_ptr(), _DTYPE_CODES[t.dtype], N, D, experts.data_ptr(), weights.data_ptr(), k, E, I2 // 2,
                    blocks1.data_ptr(), scales1.data_ptr(), bias1.data_ptr(), blocks2.data_ptr(),
                    scales2.data_ptr(), bias2.data_ptr(), _DTYPE_CODES[bias1.dtype], float(alpha),
                    float(limit), 0 if residual is None else residual.data_ptr(), out.data_ptr())
    return out


def decode_attention_block(x: torch.Tensor, attn, mlp, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           cache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Block.forward up to the router for one token per row: x [B, 1, D] (bf16/fp32) → (x + attention,
    mlp_norm of it, router logits [B, E]), each in x's dtype. attn/mlp: the block's Attention and MoE (bf16
    weights, biases in x's dtype); row b's new k/v go to cache slot slots[b] (see decode_attention)."""
    lib = load_kernels()
    c = attn.config
    dense = (attn.qkv, attn.out, mlp.gate)
    if (lib is None or x.dtype not in _DTYPE_CODES or any(m.weight.dtype != torch.bfloat16 or m.bias is None
                                                          or m.bias.dtype != x.dtype for m in dense)
            or attn.norm.scale.dtype != torch.float32 or mlp.norm.scale.dtype != torch.float32):
        return None
    B, _, D = x.shape
    x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q_pos = positions.reshape(B).long().contiguous()
    slots = slots.long().contiguous()
    sinks = None if attn.sinks is None else attn.sinks.float().contiguous()
    x_out, t_out = torch.empty_like(x), torch.empty_like(x)
    E = mlp.gate.weight.shape[0]
    logits = torch.empty(B, E, dtype=x.dtype)
    qkv, out, gate = (m.weight.contiguous() for m in dense)
    lib.decode_attention_block(
        x.data_ptr(), _DTYPE_CODES[x.dtype], B, D, attn.norm.scale.data_ptr(), float(attn.norm.eps), qkv.data_ptr(),
        attn.qkv.bias.data_ptr(), c.num_attention_heads, c.num_key_value_heads, c.head_dim, cos.data_ptr(),
        sin.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.pos.data_ptr(), cache.pos.shape[1],
        slots.data_ptr(),
        q_pos.data_ptr(), attn.sliding_window or 0, 0 if sinks is None else sinks.data_ptr(), out.data_ptr(),
        attn.out.bias.data_ptr(), mlp.norm.scale.data_ptr(), gate.data_ptr(), mlp.gate.bias.data_ptr(), E,
        x_out.data_ptr(), t_out.data_ptr(), logits.data_ptr())
    return x_out, t_out, logits
