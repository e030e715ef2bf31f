"""The GPT-oss transformer, top to bottom in data-flow order.

tokens → embedding → N × [RMSNorm → attention → residual → RMSNorm → MoE → residual] → RMSNorm → unembedding

Training ablations (config.py, all off for GPT-oss) turn the same modules into GPT-2's: LayerNorm, learned
absolute positions instead of RoPE, a dense GELU (or SwiGLU) FFN instead of the MoE, no sinks, dropout.

Shape letters: B batch, T query positions, S key positions, D hidden, H query heads, K kv heads,
G query heads per kv head (H = K·G), Dh head dim, E experts, k experts per token, I expert width, V vocab.
Parameter names equal the OpenAI `original/` checkpoint names (block.N.attn.qkv.weight, ...), so that layout
loads with no renaming; checkpoint.py maps the Hugging Face names onto these.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import kernels, mxfp4
from .cache import LayerCache, SlotLayerCache
from .config import ModelConfig

# While experts get at most this many (token, expert) rows each on average, the MoE runs the fused MXFP4
# kernel (decode, short prompts, a chat's next turn): it reads an expert's 4-bit bytes once per 8 of its rows
# and never writes a dequantized copy. Beyond, tokens are grouped by expert and each expert is dequantized
# once for a GEMM (long prompts). gpt-oss-20b on a Zen 4 (2 threads), prefill of 32/128/256/512/1024/2048
# tokens, fused vs grouped: 1.2/4.2/8.9/16.0/31.5/157 s vs 6.4/7.8/12.1/18.2/24.0/48.5 s (64 per expert at
# 512 tokens). The kernel's cost per row is per expert, so the bound scales with the expert count.
FUSED_ROWS_PER_EXPERT = 64
# On CPUs with AMX the fused kernel multiplies bf16 rows on tiles (kernels: amx_pass), and the grouped GEMMs
# (oneDNN, also on AMX) win only for long prompts. The Xeon measured (2 threads), prefill of 128/256/512/1024/
# 2048 tokens, fused vs grouped: 1.5/2.5/4.3/8.7/20.0 s vs 5.1/5.4/6.8/9.4/15.5 s (benchmarks/RESULTS.md).
# fp32 activations do not reach the tiles and keep the bound above.
FUSED_ROWS_PER_EXPERT_AMX_BF16 = 128


def fused_experts_fit(rows: int, num_experts: int, dtype: torch.dtype) -> bool:
    """Whether `rows` (token, expert) pairs over `num_experts` experts in `dtype` take the fused MXFP4 kernel."""
    if rows <= FUSED_ROWS_PER_EXPERT * num_experts:  # decode steps end here
        return True
    return (dtype == torch.bfloat16 and FUSED_ROWS_PER_EXPERT > 0  # 0: always grouped (A/B runs, tests)
            and rows <= FUSED_ROWS_PER_EXPERT_AMX_BF16 * num_experts and kernels.amx_tiles())


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for sensitive math; float64 stays float64 (used by the float64 tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# CPU bf16 GEMMs run on oneDNN, which builds a primitive for every new row count (≈ 6 ms on AMX: longer than
# a 256-row expert GEMM) and keeps up to 1024 of them (≈ 1 MB each). Prefill GEMMs round their rows up to a
# multiple of ROW_BUCKET so every layer, chunk and prompt reuses a few dozen: a 2048-token prefill of the
# 20b took 43 s without (each expert's token count new) and 19 s with, and 1.2 GiB of cache became ≈ 0.1.
ROW_BUCKET = 32


def linear_rows_bucketed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear; on CPU in bf16 the rows are zero-padded to a multiple of ROW_BUCKET and the extra rows
    dropped (rows are independent, so the kept ones are unchanged up to the GEMM's blocking)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    pad = -rows % ROW_BUCKET
    if not pad or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return F.linear(x, weight, bias)
    y = F.linear(F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad)), weight, bias)
    return y[:rows].view(*x.shape[:-1], -1)


class Linear(nn.Linear):
    """nn.Linear whose few-row CPU calls with a bf16 weight (decode) use a streaming kernel: torch's generic
    bf16 GEMM converts through slower paths on CPUs without bf16 arithmetic. Same parameters and results
    up to the order of fp32 additions; anything else (training, prefill, GPUs) is plain F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (x.device.type == "cpu" and self.weight.dtype == torch.bfloat16 and 1 <= rows <= kernels.BF16_MAX_ROWS
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            y = kernels.bf16_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias, out_dtype=x.dtype)
            return y.view(*x.shape[:-1], -1)
        return linear_rows_bucketed(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    """A bias-free Linear quantized per output row to int8 (symmetric, scale = max|row| / 127): half the bytes of
    bf16. Opt-in for the unembedding only (Transformer.quantize_unembedding), inference only; |w − q·scale| ≤
    scale / 2 per weight, and the logit error it costs is reported by benchmarks/bench_decode.py."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) fp32

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunk: int = 16384) -> "Int8Linear":
        """Quantized row chunk by row chunk: never a whole fp32 copy of a 201,088-row weight."""
        if linear.bias is not None:
            raise ValueError("Int8Linear: only bias-free layers (the unembedding) are quantized")
        rows, scales = [], []
        for n0 in range(0, linear.weight.shape[0], chunk):
            w = linear.weight[n0:n0 + chunk].detach().float()
            scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
            rows.append(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
            scales.append(scale)
        return cls(torch.cat(rows), torch.cat(scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        y = kernels.int8_linear(x.reshape(rows, x.shape[-1]), self.weight_int8, self.scale)  # fp32
        return y.view(*x.shape[:-1], -1)


class BoundedArgmax(nn.Module):
    """Exact greedy decoding that reads the unembedding mostly as int8: half the bytes of its bf16 rows, which
    are a third of a gpt-oss-20b decode step's reads.

    For the hidden state h of each row: proxy logits p = h · (q·s)ᵀ from int8 rows q with per-row scales s, and
    for every vocabulary row i a bound on |logit_i − p_i|, where logit_i is what the bf16 unembedding computes
    (fp32 sums, rounded to bf16). By Cauchy–Schwarz |h·(w_i − q_i s_i)| ≤ ‖h‖₂ ‖w_i − q_i s_i‖₂ (the second
    factor precomputed per row); the fp32 summation error of both dot products is at most γ_K Σ|h_k w_ik| ≤
    γ_K ‖h‖₂ ‖w_i‖₂ with γ_K = K·u/(1 − K·u), u = 2⁻²⁴ (Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., §3.1, eq. 3.5), and bf16 rounding adds at most 2⁻⁸ of the value. Every row whose
    upper bound reaches the largest lower bound is a candidate; only the candidates' logits are computed
    exactly, by the same kernel with the same rows of h, so they equal the full computation's bit for bit, and
    their argmax (first index on ties, as torch.argmax) is the full argmax. No approximation: the token is the
    one `unembedding(h).argmax()` gives, and a test checks it against the full logits.

    Used where the compiled CPU kernels run the unembedding (1 to kernels.BF16_MAX_ROWS rows, bf16 weight);
    elsewhere, or when the candidates are many, `__call__` returns None and the caller computes all logits."""

    MAX_CANDIDATE_SHARE = 0.125  # beyond this share of the vocabulary the full matmul reads less

    def __init__(self, unembedding: nn.Linear):
        super().__init__()
        if unembedding.bias is not None or unembedding.weight.dtype != torch.bfloat16:
            raise ValueError("BoundedArgmax: the unembedding must be a bias-free bf16 Linear, got "
                             f"{unembedding.weight.dtype}" + (" with a bias" if unembedding.bias is not None else ""))
        w = unembedding.weight.detach()
        done = kernels.quantize_rows_int8(w)  # one pass in C++; forward needs the compiled kernels as well
        if done is None:
            raise ValueError("BoundedArgmax: needs the compiled CPU kernels (and the unembedding on the CPU)")
        q, s, err, norm = done
        K = w.shape[1]
        u = 2.0 ** -24
        gamma = 2 * (K + 64) * u / (1 - (K + 64) * u)  # both dot products, plus the reductions' few additions
        self.register_buffer("weight_int8", q)  # rows as Int8Linear.from_linear quantizes them
        self.register_buffer("scale", s)
        # per row: ‖w − q·s‖₂ + γ(‖w‖₂ + ‖q·s‖₂); × (1 + 10⁻³) covers these fp32 norms' own error (≤ γ_K relative)
        self.register_buffer("row_bound", (err + gamma * (2 * norm + err)) * (1 + 1e-3))

    def forward(self, h: torch.Tensor, unembedding: nn.Linear, temperature: Sequence[float] | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor | None:
        """h [M, D] final-normed hidden states → each row's token [M] (long), or None where this path does not
        apply (the caller then computes all logits). Greedy by default; with temperature (one per row, 0 =
        greedy) and noise [M, V] (Gumbel, generate.gumbel_noise; zeros on greedy rows), the argmax of
        logits / temperature + noise, computed as generate.sample computes it: the same token."""
        M, V = h.shape[0], self.weight_int8.shape[0]
        if (h.device.type != "cpu" or not 1 <= M <= kernels.BF16_MAX_ROWS or kernels.load_kernels() is None
                or unembedding.weight.dtype != torch.bfloat16):
            return None
        h_norm = h.double().norm(dim=1).float() * (1 + 1e-6)  # (M,), rounded up
        t = None if temperature is None else torch.tensor(temperature, dtype=torch.float32)
        # one pass (C++): proxy p = h·(q·s), bound b = ‖h‖·row_bound widened by (|p| + b)·2⁻⁷ for bf16 rounding
        # (2⁻⁸, doubled) and 10⁻³⁰ for flushed denormals; lo/hi = p ∓ b (over the temperature, plus the noise)
        bounds = kernels.int8_bounds(h, self.weight_int8, self.scale, self.row_bound, h_norm, t, noise)
        if bounds is None or not bounds[2]:
            return None
        hi, max_lo, _ = bounds
        mask = hi >= max_lo[:, None]  # each row's candidates: every other row scores below its best lower bound
        candidates = mask.any(dim=0).nonzero().squeeze(1)  # the union over rows, ascending
        self.last_candidates = int(candidates.numel())  # for benchmarks: exact rows this step recomputed
        if candidates.numel() > self.MAX_CANDIDATE_SHARE * V:
            return None
        exact = kernels.bf16_linear(h, unembedding.weight.index_select(0, candidates), None, out_dtype=h.dtype)
        exact = exact.float()
        out = torch.empty(M, dtype=torch.long)
        for m in range(M):  # the row's score as generate.sample computes it, its own candidates only
            score = exact[m]
            if temperature is not None and temperature[m] > 0:
                score = score / temperature[m] + noise[m, candidates]
            out[m] = candidates[score.masked_fill(~mask[m, candidates], float("-inf")).argmax()]
        return out


# ---------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """Scale-only RMSNorm, computed in fp32 whatever the activation dtype (GPT-oss keeps norms in fp32).
    centered=True: LayerNorm instead (subtract the mean, then add a bias; GPT-2)."""

    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None, centered: bool = False):
        super().__init__()
        self.eps, self.centered = eps, centered
        self.scale = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))
        if centered:
            self.bias = nn.Parameter(torch.zeros(dim, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.centered and x.device.type == "cpu" and x.numel() <= kernels.FUSED_MAX_ROWS * x.shape[-1]
                and not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad))):
            out = kernels.rmsnorm(x, self.scale, self.eps)  # decode: one call instead of eight small ops
            if out is not None:
                return out
        t = at_least_fp32(x)
        if self.centered:
            t = t - t.mean(-1, keepdim=True)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        return (t * self.scale + self.bias if self.centered else t * self.scale).to(x.dtype)


def make_norm(config: ModelConfig, dim: int, device=None) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, device=device, centered=config.norm_type == "layer")


# ---------------------------------------------------------------- RoPE with YaRN
def yarn_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dh/2] (fp32) and the attention concentration, per YaRN (Peng et al. 2023).

    NTK-by-parts: dimensions rotating fast within the original context keep their frequency (extrapolation),
    slow ones are divided by the scaling factor (interpolation), with a linear ramp between the correction
    dims of β_fast and β_slow rotations. cos/sin are then scaled by 0.1·ln(factor) + 1.
    """
    dim, base, factor = config.head_dim, config.rope_theta, config.rope_scaling_factor
    freq = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if factor <= 1:
        return 1.0 / freq, 1.0

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(config.initial_context_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(config.rope_ntk_beta), correction_dim(config.rope_ntk_alpha)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)  # only matters for tiny test shapes; 20b: 8.09 .. 17.40
    high = high if high != low else high + 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp  # 1 where the dimension keeps its original frequency
    inv_freq = (1.0 / (factor * freq)) * (1 - extrapolation) + (1.0 / freq) * extrapolation
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] → cos, sin [B, T, 1, Dh/2] in fp32, concentration applied."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    return (angles.cos() * concentration)[:, :, None], (angles.sin() * concentration)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, n, Dh] by half-split pairs (i, i + Dh/2), not interleaved pairs; fp32 math."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ---------------------------------------------------------------- attention
def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query sees: causal, and on sliding layers only q − window < k ≤ q. [B, T, S] bool.

    Positions are explicit so the same mask serves a KV cache; a key position < 0 marks an empty slot.
    `segments` [B, T] (training on packed sequences, no cache): a token sees only keys of its own document;
    positions then restart at 0 in each document, so the causal test alone would let documents mix.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k <= q) & (k >= 0)
    if sliding_window is not None:
        allowed &= k > q - sliding_window  # window counts the current token: 128 keys at most
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed


SCORES_BUDGET_BYTES = 16 * 2**20  # fp32 attention scores per query tile (the materialized path)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Where the CPU multiplies bf16 natively (AVX-512 BF16, AMX) a bf16 model's prefill attention over at least
# BF16_ATTENTION_MIN_QUERIES queries runs the flash kernel in bf16: fp32 accumulators and softmax,
# probabilities and the (fp32-cached) keys and values rounded to bf16, as a bf16 cache and FlashAttention on
# GPUs do. 20b, 2048 tokens: attention 4.3 -> 2.1 s of a 21 -> 18 s prefill; logits of the bf16 parity models
# no further from fp32. Shorter chunks (no gain at 128 tokens) and decode steps (then the same numbers as the
# fused decode kernel's fp32 attention) stay in fp32, as does everything where fp32 is the faster.
_CPU_BF16_NATIVE = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
BF16_ATTENTION_MIN_QUERIES = 256


def sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                    mask: torch.Tensor, dropout: float = 0.0, self_window: int | None | bool = False) -> torch.Tensor:
    """Grouped-query attention whose softmax denominator includes one learned sink logit per head.

    q [B, T, K, G, Dh], k/v [B, S, K, Dh], sinks [H], mask [B, T, S] → [B, T, H·Dh].
    The sink is an extra column of scores dropped after the softmax, so a head may attend to "nothing".
    sinks None: plain softmax attention. dropout: on the attention weights (GPT-2; training only).
    self_window: False, or the keys are the queries' own tokens (no cache) and this is the layer's sliding
    window (None: causal), which bounds the keys a query tile can see without looking at the mask.
    """
    tensors = (q, k, v) if sinks is None else (q, k, v, sinks)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if _FLASH_CPU is not None and q.device.type == "cpu" and not dropout and q.dtype != torch.float64 and not training:
        return flash_sdpa_with_sinks(q, k, v, sinks, mask)
    if training and not dropout and q.dtype != torch.float64:
        return trainable_sdpa_with_sinks(q, k, v, sinks, mask, self_window)
    return materialized_sdpa_with_sinks(q, k, v, sinks, mask, dropout)


TRAIN_QUERY_TILE = 64  # small preset, 256 tokens, fwd+bwd: 3.2× (window 32) and 1.9× (causal) the materialized time


def trainable_sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                              mask: torch.Tensor, self_window: int | None | bool = False) -> torch.Tensor:
    """sdpa_with_sinks for training, on torch's fused attention (`F.scaled_dot_product_attention`, with its own
    backward), in fp32 like the materialized path.

    The fused kernels have no sink; it becomes one extra key per query head whose score is the sink: queries
    get one more dimension equal to √Dh (so that q'·k'/√Dh adds 1 · sink), real keys 0 there, the sink key is
    zero except `sink` there, its value is zero. The sink's gradient then flows through that key. Queries go in
    tiles of TRAIN_QUERY_TILE, each over only the span of keys it can see (a sliding layer reads ~2 windows, a
    causal tile skips the keys after it). Under torch.compile, with self_window given (sdpa_with_sinks), a tile's
    key span comes from its index and the window, not from the mask, so that no shape depends on the data: a
    superset of the keys the mask lets it see (packed documents only narrow it), so the same result."""
    B, T, K, G, Dh = q.shape
    H, S = K * G, k.shape[1]
    out_dtype = q.dtype
    pad = 1 if q.device.type == "cpu" else 8  # GPUs' fused kernels want head dims in multiples of 8
    scale = 1 / math.sqrt(Dh)
    q, k, v = at_least_fp32(q), at_least_fp32(k), at_least_fp32(v)
    extra = torch.zeros(pad, dtype=q.dtype, device=q.device)
    extra[0] = 1 / scale
    qa = torch.cat((q.reshape(B, T, H, Dh).transpose(1, 2), extra.expand(B, H, T, pad)), -1)  # (B, H, T, Dh+pad)
    ka = F.pad(k.transpose(1, 2).repeat_interleave(G, dim=1), (0, pad))  # (B, H, S, Dh+pad)
    va = F.pad(v.transpose(1, 2).repeat_interleave(G, dim=1), (0, pad))
    if sinks is not None:
        sink_key = F.pad(sinks.to(q.dtype)[:, None], (Dh, pad - 1))  # (H, Dh+pad): sink at index Dh
        sink_key = sink_key[None, :, None].expand(B, H, 1, Dh + pad)
        zero_value = va.new_zeros(B, H, 1, Dh + pad)
    outs = []
    with torch.autocast(q.device.type, enabled=False):  # fp32, as the materialized path
        for i in range(0, T, TRAIN_QUERY_TILE):
            m = mask[:, i:i + TRAIN_QUERY_TILE]  # (B, t, S)
            if self_window is not False and S == T and torch.compiler.is_compiling():
                lo, hi = max(0, i - self_window + 1) if self_window else 0, min(S, i + TRAIN_QUERY_TILE)
            else:
                seen = m.any(1).any(0).nonzero()
                lo, hi = (int(seen[0]), int(seen[-1]) + 1) if len(seen) else (0, 1)
            m, kk, vv = m[:, None, :, lo:hi], ka[:, :, lo:hi], va[:, :, lo:hi]
            if sinks is not None:
                m = torch.cat((m, m.new_ones(m.shape[:-1] + (1,))), -1)
                kk, vv = torch.cat((kk, sink_key), 2), torch.cat((vv, zero_value), 2)
            out = F.scaled_dot_product_attention(qa[:, :, i:i + TRAIN_QUERY_TILE], kk, vv, attn_mask=m, scale=scale)
            # a row that sees nothing (no sink): NaN from the kernel, zeros in the materialized path
            outs.append(torch.nan_to_num(out[..., :Dh]) if sinks is None else out[..., :Dh])
    return torch.cat(outs, 2).transpose(1, 2).reshape(B, T, H * Dh).to(out_dtype)


def flash_sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                          mask: torch.Tensor) -> torch.Tensor:
    """sdpa_with_sinks for CPU inference (prefill) on torch's fused flash kernel, which never holds T×S scores.

    The kernel has no sink, but it returns each row's logsumexp L of the scores, and adding e^sink to the
    denominator scales that row's output by e^L / (e^L + e^sink) = sigmoid(L − sink). Queries go in tiles,
    each over only the keys some query of the tile can see: a sliding layer's tile of 128 queries reads
    ≤ 255 keys instead of the ring plus the whole chunk, and causal tiles skip the keys after them.
    A fully masked row (a pad token) comes back as zeros, as in the materialized path.
    """
    B, T, K, G, Dh = q.shape
    out_dtype = q.dtype  # the activations' dtype (the cache may hold fp32)
    # bf16 activations on a CPU with bf16 math: the kernel in bf16, keys and values (an fp32 cache on CPU)
    # rounded as the tile gathers them. Otherwise fp32.
    bf16 = _CPU_BF16_NATIVE and q.dtype == torch.bfloat16 and T >= BF16_ATTENTION_MIN_QUERIES
    compute = torch.bfloat16 if bf16 else torch.promote_types(q.dtype, torch.float32)
    visible = int(mask.sum(-1).max()) if mask.numel() else 0  # the most keys one query sees
    tile = min(512, max(64, visible))  # 20b, 2048 tokens: 128 on sliding layers, 512 on full ones were fastest
    outs = []
    for i in range(0, T, tile):
        m = mask[:, i:i + tile]
        keys = m.any(1).any(0).nonzero().squeeze(1)
        m = m[:, :, keys]
        bias = q.new_zeros((B, 1) + m.shape[1:], dtype=compute).masked_fill_(~m[:, None], float("-inf"))
        out, lse = _FLASH_CPU(q[:, i:i + tile].flatten(2, 3).transpose(1, 2).to(compute),
                              k[:, keys].transpose(1, 2).to(compute), v[:, keys].transpose(1, 2).to(compute),
                              attn_mask=bias, scale=1 / math.sqrt(Dh))
        if sinks is not None:  # out (B, H, t, Dh), lse (B, H, t) in fp32
            out = at_least_fp32(out) * torch.sigmoid(lse - sinks.to(lse.dtype)[:, None])[..., None]
        outs.append(out.transpose(1, 2).flatten(2))  # (B, t, H·Dh)
    return torch.cat(outs, dim=1).to(out_dtype)


def materialized_sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                                 mask: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """sdpa_with_sinks with the scores in memory: autograd, dropout, float64, GPUs."""
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    # Long prompts: queries in tiles, so the fp32 scores (and the softmax's copies of them) stay near 16 MiB
    # instead of 268 MB for a 512-token chunk over 2048 keys. Rows are independent: the same result,
    # and on the 20b a 2048-token prefill took 40 s instead of 53 s (cache-sized tiles) with 0.1 GiB less peak.
    tile = max(1, SCORES_BUDGET_BYTES // (4 * B * K * G * max(S, 1)))
    if T > tile:
        return torch.cat([materialized_sdpa_with_sinks(q[:, i:i + tile], k, v, sinks, mask[:, i:i + tile],
                                                       dropout)
                          for i in range(0, T, tile)], dim=1)
    out_dtype = q.dtype  # the activations' dtype (the cache may hold fp32)
    # fp32 throughout: exact softmax, and CPUs without bf16 arithmetic run fp32 matmuls ~10× faster.
    q, k, v = at_least_fp32(q), at_least_fp32(k), at_least_fp32(v)
    q = q.permute(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)  # (B, K, G·T, Dh): a query group is one matmul
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)).view(B, K, G, T, -1) / math.sqrt(Dh)  # (B, K, G, T, S)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    if sinks is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(scores.dtype).reshape(1, K, G, 1, 1).expand(B, K, G, T, 1)
        weights = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    if dropout:
        weights = F.dropout(weights, dropout)
    out = torch.matmul(weights.reshape(B, K, G * T, -1), v.permute(0, 2, 1, 3))  # (B, K, G·T, Dh)
    out = out.view(B, K, G, T, Dh).permute(0, 3, 1, 2, 4)  # (B, T, K, G, Dh)
    return out.reshape(B, T, K * G * Dh).to(out_dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = config
        self.sliding_window = config.sliding_window if config.is_sliding(layer) else None
        self.norm = make_norm(config, config.hidden_size, device=device)
        self.qkv = Linear(config.hidden_size, config.qkv_dim, bias=True, device=device, dtype=dtype)
        self.sinks = None
        if config.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads, dtype=torch.float32, device=device))
        self.out = Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=True,
                             device=device, dtype=dtype)
        if config.qk_norm:  # RMSNorm of queries and keys before RoPE; off in GPT-oss
            # OLMo-2 (Team OLMo 2024, §2.1 and §3.3.2; transformers' Olmo2Attention) normalises the whole q and k projections
            # (num_heads·head_dim) before the head split; Qwen3 normalises each head over head_dim ("per_head")
            whole = config.qk_norm == "olmo2"
            q_dim = config.num_attention_heads * config.head_dim if whole else config.head_dim
            k_dim = config.num_key_value_heads * config.head_dim if whole else config.head_dim
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps, device=device)
            self.k_norm = RMSNorm(k_dim, config.rms_norm_eps, device=device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache=None, segments: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        post = c.norm_placement == "post"  # OLMo-2: normalize the sublayer's output instead of its input
        qkv = self.qkv(x if post else self.norm(x))
        if T == 1 and self._fusable(x, cache, segments):
            out = self._decode_fused(qkv, positions, cos, sin, cache)
            if out is not None:
                return x + self.out(out)
        # Fused rows: all query heads, then key heads, then value heads; query head h uses kv head h // G.
        q, k, v = qkv.split([c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                             c.num_key_value_heads * c.head_dim], dim=-1)
        if c.qk_norm == "olmo2":  # over (H·Dh) and (K·Dh)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, c.num_attention_heads, c.head_dim), k.view(B, T, c.num_key_value_heads, c.head_dim)
        if c.qk_norm == "per_head":  # over Dh
            q, k = self.q_norm(q), self.k_norm(k)
        if c.position_embedding == "rope":
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(B, T, c.num_key_value_heads, c.head_dim)
        k_pos = positions
        if cache is not None:  # the cache returns every key it holds for this layer, and their positions
            k, v, k_pos = cache.update(k, v, positions)
        mask = attention_mask(positions, k_pos, self.sliding_window, segments)
        q = q.view(B, T, c.num_key_value_heads, c.q_per_kv, c.head_dim)
        p = c.dropout if self.training else 0.0
        h = self.out(sdpa_with_sinks(q, k, v, self.sinks, mask, p, self.sliding_window if cache is None else False))
        h = self.norm(h) if post else h
        return x + (F.dropout(h, p) if p else h)  # residual dropout (GPT-2)

    def _fusable(self, x: torch.Tensor, cache, segments) -> bool:
        """Decode on CPU with GPT-oss's own attention (RoPE, pre-norm, no QK-norm) into an fp32 cache."""
        c = self.config
        return (segments is None and x.device.type == "cpu"
                and not (self.training and c.dropout) and c.position_embedding == "rope" and not c.qk_norm
                and c.norm_placement == "pre"
                and isinstance(cache, (LayerCache, SlotLayerCache)) and cache.fusable()
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _decode_fused(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache) -> torch.Tensor | None:
        """RoPE, cache write and attention for one new token per row in one kernel call (the torch code above
        is ~45 small ops per layer, which at batch 1 cost more than their arithmetic)."""
        c = self.config
        out = kernels.decode_attention(qkv, c.num_attention_heads, c.num_key_value_heads, c.head_dim, cos, sin,
                                       cache.k, cache.v, cache.pos, cache.decode_slots(positions), positions,
                                       self.sliding_window, self.sinks)
        if out is not None:  # None: nothing written, the caller's torch path appends the token instead
            cache.commit()
        return out


# ---------------------------------------------------------------- MoE
def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Clamped SwiGLU of GPT-oss on interleaved columns: even = gate, odd = linear. [.., 2I] → [.., I]."""
    return swiglu_halves(h[..., ::2], h[..., 1::2], alpha, limit)


def swiglu_halves(gate: torch.Tensor, linear: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """`swiglu` on the gate and linear columns already apart."""
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


# torch.compile traces F.grouped_mm for bf16 only (its meta function insists on it); an fp32 grouped GEMM runs
# eagerly, a graph break around it ([train] compile with dtype "float32")
_eager_grouped_mm = torch.compiler.disable(F.grouped_mm) if hasattr(F, "grouped_mm") else None


def grouped_experts(t: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                    b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, alpha: float, limit: float,
                    group_rows_multiple: int | None = None) -> torch.Tensor:
    """The experts of dense weights (training) as two grouped GEMMs: the (token, expert) rows sorted by expert,
    each projection one `F.grouped_mm` call over all experts (no Python loop, one autograd node each).

    t [N, D], experts/weights [N, k] (−1: dropped for capacity), w1 [E, 2I, D], b1 [E, 2I], w2 [E, D, I],
    b2 [E, D] → [N, D] fp32. Under autocast the GEMMs run in its dtype (grouped_mm has no autocast rule).
    Each expert's group is padded with zero rows to a multiple of `group_rows_multiple` (default ROW_BUCKET on
    CPU, 1 elsewhere): oneDNN builds a GEMM per row count (≈ 2.6 ms on an AMX Xeon, ten times a 256-wide expert
    GEMM) and the groups change size every step. Padding rows are computed and discarded, never added."""
    N, k = experts.shape
    E = w1.shape[0]
    P = group_rows_multiple or (ROW_BUCKET if t.device.type == "cpu" else 1)
    dtype = torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype
    # Every shape below is fixed by N, k, E and P, none by the routing (no nonzero/bincount), so that
    # torch.compile traces a block whole ([train] compile): dropped assignments sort last as a virtual expert
    # E, past the last group, and no padded position points at them.
    flat = experts.reshape(-1)  # (N·k,) token-major
    key = torch.where(flat < 0, E, flat)
    rows = torch.argsort(key, stable=True)  # (N·k,) the assignments grouped by expert, dropped ones last
    ends = torch.searchsorted(key.index_select(0, rows), torch.arange(E, device=t.device), right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) rows of each expert
    padded = (counts + P - 1) // P * P
    padded_ends = torch.cumsum(padded, 0)  # (E,) group ends after padding
    L = N * k + E * (P - 1)  # room for every group padded, whatever the routing
    pos = torch.arange(L, device=t.device)
    group = torch.searchsorted(padded_ends, pos, right=True).clamp(max=E - 1)  # (L,) the expert of a position
    rank = pos - (padded_ends - padded).index_select(0, group)
    count = counts.index_select(0, group)
    valid = (pos < padded_ends[-1]) & (rank < count)  # a real assignment sits here
    src = torch.where(valid, ends.index_select(0, group) - count + rank, 0)
    assignment = torch.where(valid, rows.index_select(0, src), N * k)  # (L,) flat (token, slot); N·k: none
    position = torch.full((N * k + 1,), L, dtype=pos.dtype, device=t.device).index_copy(0, assignment, pos)[:-1]
    offs = padded_ends.to(torch.int32)
    gmm = F.grouped_mm if dtype == torch.bfloat16 else _eager_grouped_mm
    # Rows move between token order and group order by gathers both ways (`permute_rows`), never by index_add,
    # and the biases enter as a one-hot GEMM: index_add's parallel form on CPU (inductor's) is an atomic add
    # per element, which cost more than the GEMMs themselves.
    onehot = torch.where(valid[:, None], F.one_hot(group, E), 0).to(dtype)  # (L, E); padding rows: none
    x = permute_rows(t.to(dtype)[:, None].expand(N, k, t.shape[1]).reshape(N * k, -1), assignment, position)
    # w1's interleaved gate/linear rows as two halves (a reshape, whose backward is one too): the activation
    # then reads contiguous columns, where the stride-2 slices kept inductor's kernels from vectorizing
    I = w1.shape[1] // 2
    w1 = w1.view(E, I, 2, -1).transpose(1, 2).reshape(E, 2 * I, -1)
    b1 = b1.view(E, I, 2).transpose(1, 2).reshape(E, 2 * I)
    h = gmm(x, w1.to(dtype).transpose(1, 2), offs=offs) + onehot @ b1.to(dtype)  # (L, 2I): gate | linear
    # grouped_mm leaves the rows past the last group undefined, forward and backward: `torch.where` (not × 0)
    # keeps them out of every value and gradient (x's, the biases', the weights')
    keep = valid[:, None]
    h = torch.where(keep, h, 0)
    h = swiglu_halves(h[:, :I], h[:, I:], alpha, limit)  # (L, I)
    y = gmm(h.to(dtype), w2.to(dtype).transpose(1, 2), offs=offs) + onehot @ b2.to(dtype)
    y = permute_rows(torch.where(keep, y.float(), 0.0), position, assignment)  # (N·k, D), dropped: 0
    return (y.view(N, k, -1) * weights[..., None]).sum(dim=1)


class _PermuteRows(torch.autograd.Function):
    """out[m] = src[index[m]], where each row of src is read at most once (a partial permutation; an index
    equal to len(src) reads a zero row). The backward is a gather too, grad_src[s] = grad[inverse[s]]
    (len(out): none), where index_select's own backward would be an index_add."""

    @staticmethod
    def forward(ctx, src, index, inverse):
        ctx.save_for_backward(inverse)
        return torch.cat([src, src.new_zeros(1, *src.shape[1:])]).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])]).index_select(0, inverse), None, None


def permute_rows(src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """src.index_select(0, index) for a partial permutation whose inverse is known (see `_PermuteRows`)."""
    return _PermuteRows.apply(src, index, inverse)


class _MXFP4Linear(torch.autograd.Function):
    """x @ W_eᵀ + b with W_e dequantized from MXFP4 in the forward and again in the backward: autograd keeps
    only the uint8 blocks/scales, never a dense expert (LoRA fine-tuning through frozen MXFP4 experts)."""

    @staticmethod
    def forward(ctx, x, blocks, scales, bias):
        ctx.save_for_backward(blocks, scales)
        ctx.x_dtype = x.dtype
        return F.linear(x, kernels.mxfp4_dequantize(blocks, scales, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        blocks, scales = ctx.saved_tensors
        w = kernels.mxfp4_dequantize(blocks, scales, torch.float32)  # (out, in)
        grad_x = (grad.float() @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


class MXFP4Weight(nn.Module):
    """A stack of E expert weights [E, out, in] kept as MXFP4 blocks and scales; dequantized one expert at a time."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, device=None):
        super().__init__()
        groups = in_features // mxfp4.BLOCK
        self.register_buffer("blocks", torch.zeros(num_experts, out_features, groups, mxfp4.BYTES_PER_BLOCK,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.full((num_experts, out_features, groups), mxfp4.SCALE_BIAS,
                                                  dtype=torch.uint8, device=device))

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Dense [out, in] weight of expert e (a transient copy of one expert, for a prefill GEMM)."""
        return kernels.mxfp4_dequantize(self.blocks[e], self.scales[e], dtype)

    def linear(self, x: torch.Tensor, e: int, bias: torch.Tensor) -> torch.Tensor:
        """x [n, in] → [n, out] through expert e; differentiable in x and bias without keeping dense weights."""
        if torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad):
            return _MXFP4Linear.apply(x, self.blocks[e], self.scales[e], bias)
        return linear_rows_bucketed(x, self.expert(e, x.dtype), bias)

    def nbytes(self) -> int:
        return mxfp4.nbytes(self.blocks, self.scales)


class DenseExpertWeight(nn.Module):
    """The same stack [E, out, in] as a trainable dense parameter (training; quantized to MXFP4 on save)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    @classmethod
    def from_mxfp4(cls, w: MXFP4Weight, dtype: torch.dtype = torch.float32) -> "DenseExpertWeight":
        E, out_features, groups = w.scales.shape
        weight = torch.empty(E, out_features, groups * mxfp4.BLOCK, dtype=dtype, device=w.blocks.device)
        for e in range(E):  # one expert's temporaries at a time
            weight[e] = kernels.mxfp4_dequantize(w.blocks[e], w.scales[e], dtype)
        return cls(weight)

    def expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[e].to(dtype)

    def linear(self, x: torch.Tensor, e: int, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.expert(e, x.dtype), bias)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class ExpertWeights(NamedTuple):
    """The expert tensors a MoE layer computes with, and which row of them holds each expert: the layer's own
    (rows None: row e is expert e) or the slots of a streaming pool (streaming.ExpertPool: rows[e] is expert
    e's slot, −1 where it is not resident)."""
    mlp1_weight: "MXFP4Weight | DenseExpertWeight"
    mlp1_bias: torch.Tensor
    mlp2_weight: "MXFP4Weight | DenseExpertWeight"
    mlp2_bias: torch.Tensor
    rows: torch.Tensor | None = None

    def row(self, e: int) -> int:
        return e if self.rows is None else int(self.rows[e])

    def rows_of(self, experts: torch.Tensor) -> torch.Tensor:
        return experts if self.rows is None else self.rows[experts]


class Routing(NamedTuple):
    """What a MoE layer decided (kept while `record_routing` is on, for router losses and load metrics)."""
    logits: torch.Tensor  # (N, E) router logits
    selected: torch.Tensor  # (N, k) the top-k experts chosen
    experts: torch.Tensor  # (N, k) the same after the capacity limit: −1 where the assignment was dropped


def capacity_drop(experts: torch.Tensor, num_experts: int, capacity_factor: float,
                  priority: torch.Tensor | None = None) -> torch.Tensor:
    """Expert capacity (Switch Transformer, §2.2 "expert capacity"): each expert takes at most ⌈N·k/E · factor⌉
    assignments; the rest become −1 (dropped: that slot adds nothing, the token keeps its residual). Queue order:
    every token's first choice before any second choice (GShard, Lepikhin et al. 2020, §2.2), and within a
    slot tokens by position, or, given `priority` [N], by descending priority (ties by position): V-MoE's Batch
    Prioritized Routing (Riquelme et al. 2021, §4), which ranks tokens by their top routing weight. In a causal
    LM that lets later tokens decide whether an earlier one is dropped (a leak positional order avoids)."""
    N, k = experts.shape
    capacity = math.ceil(round(N * k / num_experts * capacity_factor, 9))
    order = None
    if priority is not None:
        order = torch.sort(priority, descending=True, stable=True).indices  # (N,) token ranks
        experts = experts[order]
    flat = experts.t().reshape(-1)  # (k·N,) slot-major
    onehot = F.one_hot(flat.clamp(min=0), num_experts) * (flat >= 0)[:, None]  # (k·N, E)
    place = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each assignment in its expert's queue
    kept = torch.where((place < capacity).view(k, N).t(), experts, -1)
    if order is not None:
        kept = torch.empty_like(kept).index_copy_(0, order, kept)
    return kept


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = config
        E, D, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.norm = make_norm(config, D, device=device)
        self.capacity_factor: float | None = None
        self.capacity_priority = "position"  # or "score" (capacity_drop)
        # Data parallel: gathers a [n, ...] tensor from every rank → ([world·n, ...] in rank order, this rank's
        # first row), so that capacity is decided over the global micro-batch exactly as one process would.
        self.capacity_gather = None
        self.register_buffer("expert_bias", None, persistent=False)
        self.record_routing = False
        self.routing: Routing | None = None
        # Inference on a model larger than memory: the experts live in a streaming.LayerExperts (a pool of
        # slots filled from the checkpoint on demand) instead of mlp1_weight/mlp2_weight (then empty).
        self.streamed = None
        # LoRA on the experts (train/lora.py ExpertLoRA): low-rank updates added to each chosen expert's
        # projections while its base weight stays as loaded (MXFP4); None: no adapters.
        self.expert_lora = None
        if config.mlp_type != "moe":  # one dense FFN (GPT-2: GELU, width I; "swiglu": GPT-oss's, width 2I → I)
            width = 2 * I if config.mlp_type == "swiglu" else I
            self.mlp1 = Linear(D, width, bias=True, device=device, dtype=dtype)
            self.mlp2 = Linear(I, D, bias=True, device=device, dtype=dtype)
            return
        self.gate = Linear(D, E, bias=True, device=device, dtype=dtype)  # the router
        self.mlp1_weight = MXFP4Weight(E, 2 * I, D, device=device)
        self.mlp1_bias = nn.Parameter(torch.zeros(E, 2 * I, device=device, dtype=dtype))
        self.mlp2_weight = MXFP4Weight(E, D, I, device=device)
        self.mlp2_bias = nn.Parameter(torch.zeros(E, D, device=device, dtype=dtype))
        # Training options, set above, off for GPT-oss: expert capacity, a selection-only bias (DeepSeek-V3,
        # expert_bias (E,) when bias balancing is on), routing recorded for router losses.

    def _capacity(self, experts: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """capacity_drop over this micro-batch, or over the global one under data parallelism (capacity_gather)."""
        priority = None
        if self.capacity_priority == "score":  # a token's top router probability (softmax over all experts)
            priority = torch.softmax(logits.detach().float(), dim=-1).max(-1).values
        if self.capacity_gather is None:
            return capacity_drop(experts, self.config.num_experts, self.capacity_factor, priority)
        everyone, first = self.capacity_gather(experts)
        if priority is not None:
            priority = self.capacity_gather(priority)[0]
        kept = capacity_drop(everyone, self.config.num_experts, self.capacity_factor, priority)
        return kept[first:first + experts.shape[0]]

    def route(self, t: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N, D] → expert ids [N, k] and weights [N, k]: softmax over the top-k router logits only."""
        logits = self.gate(t) if logits is None else logits  # (N, E)
        k = self.config.experts_per_token
        if self.expert_bias is None:
            top, experts = torch.topk(logits, k, dim=-1, sorted=True)
        else:  # the bias picks the experts but never weighs them
            experts = torch.topk(logits + self.expert_bias, k, dim=-1, sorted=True).indices
            top = logits.gather(-1, experts)
        return experts, torch.softmax(top.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        c = self.config
        post = c.norm_placement == "post"
        t = (x if post else self.norm(x)).reshape(B * T, D)
        if c.mlp_type != "moe":
            out = self._dense(t)
        elif self.streamed is not None:  # x guesses the next layer's experts (read while these compute)
            out = self._experts(t.to(x.dtype), hint=x)
        else:
            out = self._experts(t.to(x.dtype))  # (N, D)
        out = out.view(B, T, D).to(x.dtype)
        out = self.norm(out) if post else out
        p = c.dropout if self.training else 0.0
        return x + (F.dropout(out, p) if p else out)  # residual dropout (GPT-2)

    def _dense(self, t: torch.Tensor) -> torch.Tensor:
        """One dense FFN for every token: GELU (tanh approximation, GPT-2) or GPT-oss's clamped SwiGLU."""
        c = self.config
        h = self.mlp1(t)  # (N, I) or (N, 2I)
        h = F.gelu(h, approximate="tanh") if c.mlp_type == "gelu" else swiglu(h, c.swiglu_alpha, c.swiglu_limit)
        return self.mlp2(h)

    def _experts(self, t: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        """Route t [N, D] to the top-k experts and mix their outputs → [N, D] (fp32). hint: the residual
        stream, for a streamed layer's guess at the next layer's experts."""
        logits = self.gate(t)  # (N, E)
        experts, weights = self.route(t, logits)  # (N, k) each
        selected = experts
        if self.capacity_factor is not None:
            experts = self._capacity(experts, logits)
        if self.record_routing:
            self.routing = Routing(logits, selected, experts)
        fused = (t.device.type == "cpu" and t.dtype != torch.float64
                 and fused_experts_fit(experts.numel(), self.config.num_experts, t.dtype)
                 and isinstance(self.mlp1_weight, MXFP4Weight) and self.capacity_factor is None
                 and self.expert_lora is None  # the kernel knows no adapters
                 and not (torch.is_grad_enabled() and t.requires_grad))  # the fused kernel has no backward
        if self.streamed is None:
            w = self.expert_weights()
            return self._fused(t, experts, weights, w) if fused else self._grouped(t, experts, weights, w)
        out = torch.zeros(t.shape[0], self.config.hidden_size, dtype=torch.float32, device=t.device)
        if fused:  # tokens whose experts the pool holds at once (all of them, unless it is small)
            for tokens, w in self.streamed.token_groups(experts, hint):
                if tokens is None:
                    return self._fused(t, experts, weights, w)
                out[tokens] = self._fused(t[tokens], experts[tokens], weights[tokens], w)
            return out
        for w in self.streamed.waves(experts, hint):  # as many experts at a time as the pool holds, ascending
            self._grouped(t, experts, weights, w, out)
        return out

    def expert_weights(self) -> ExpertWeights:
        """This layer's own expert tensors (not streamed)."""
        return ExpertWeights(self.mlp1_weight, self.mlp1_bias, self.mlp2_weight, self.mlp2_bias)

    def fused_kernel(self, t: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w: ExpertWeights,
                     residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """kernels.moe_experts on the tensors of `w` (None where the kernel cannot run)."""
        c = self.config
        return kernels.moe_experts(t, w.rows_of(experts), weights, w.mlp1_weight.blocks, w.mlp1_weight.scales,
                                   w.mlp1_bias, w.mlp2_weight.blocks, w.mlp2_weight.scales, w.mlp2_bias,
                                   c.swiglu_alpha, c.swiglu_limit, residual=residual)

    def _fused(self, t: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
               w: ExpertWeights) -> torch.Tensor:
        """Decode: each (token, expert) pair is a row; the kernel reads only the chosen experts' MXFP4 bytes."""
        c, (N, k) = self.config, experts.shape
        out = self.fused_kernel(t, experts, weights, w)
        if out is not None:  # the same steps as below in one call
            return out
        rows = w.rows_of(experts).reshape(N * k)
        h = kernels.mxfp4_linear(t.repeat_interleave(k, dim=0), w.mlp1_weight.blocks, w.mlp1_weight.scales,
                                 w.mlp1_bias, rows)  # (N·k, 2I) fp32
        h = swiglu(h, c.swiglu_alpha, c.swiglu_limit).to(t.dtype)  # (N·k, I), rounded as the GEMM path does
        y = kernels.mxfp4_linear(h, w.mlp2_weight.blocks, w.mlp2_weight.scales, w.mlp2_bias, rows)
        return (y.view(N, k, -1) * weights[..., None]).sum(dim=1)  # (N, D) fp32

    def _grouped(self, t: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                 w: ExpertWeights | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill: group tokens by expert, one matmul per active expert, each expert dequantized once, in
        ascending expert order (experts that `w` does not hold are skipped: another wave adds them to `out`)."""
        c = self.config
        w = self.expert_weights() if w is None else w
        lora = self.expert_lora
        if (out is None and w.rows is None and isinstance(w.mlp1_weight, DenseExpertWeight) and lora is None
                and hasattr(F, "grouped_mm") and t.dtype in (torch.float32, torch.bfloat16)):  # training: no loop
            return grouped_experts(t, experts, weights, w.mlp1_weight.weight, w.mlp1_bias, w.mlp2_weight.weight,
                                   w.mlp2_bias, c.swiglu_alpha, c.swiglu_limit)
        if out is None:
            out = torch.zeros(t.shape[0], c.hidden_size, dtype=torch.float32, device=t.device)
        for e in experts.unique().tolist():
            row = w.row(e) if e >= 0 else -1
            if row < 0:  # assignments dropped for capacity, or an expert of another wave
                continue
            token, slot = (experts == e).nonzero(as_tuple=True)
            x = t[token]
            h = w.mlp1_weight.linear(x, row, w.mlp1_bias[row])  # (n, 2I)
            if lora is not None:
                h = h + lora.mlp1(x, e)
            act = kernels.swiglu(h, c.swiglu_alpha, c.swiglu_limit)  # one pass on CPU (None elsewhere)
            h = act if act is not None else swiglu(h, c.swiglu_alpha, c.swiglu_limit)  # (n, I)
            y = w.mlp2_weight.linear(h, row, w.mlp2_bias[row])  # (n, D)
            if lora is not None:
                y = y + lora.mlp2(h, e)
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out


# ---------------------------------------------------------------- the model
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.attn = Attention(config, layer, device=device, dtype=dtype)  # norm + attention + residual
        self.mlp = MoE(config, device=device, dtype=dtype)  # norm + MoE + residual

    def forward(self, x, positions, cos, sin, cache=None, segments=None) -> torch.Tensor:
        if x.shape[1] == 1 and x.shape[0] <= kernels.BF16_MAX_ROWS and self._fusable(x, cache, segments):
            y = self._decode_fused(x, positions, cos, sin, cache)
            if y is not None:
                return y
        return self.mlp(self.attn(x, positions, cos, sin, cache, segments))

    def _fusable(self, x: torch.Tensor, cache, segments) -> bool:
        m = self.mlp
        return (self.attn._fusable(x, cache, segments) and m.config.mlp_type == "moe"
                and isinstance(m.mlp1_weight, MXFP4Weight) and m.capacity_factor is None and not m.record_routing
                and m.expert_lora is None)

    def _decode_fused(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache) -> torch.Tensor | None:
        """A decode step of this block in two kernel calls around the router's top-k (kept in torch, so that
        ties and the balancing bias pick the same experts as the code above): the same operations and roundings
        as attn + mlp, without the ~80 small torch ops per layer that dominate a batch-1 step on CPU."""
        m = self.mlp
        first = kernels.decode_attention_block(x, self.attn, m, positions, cos, sin, cache,
                                               cache.decode_slots(positions))
        if first is None:  # nothing was written: the torch path appends the token
            return None
        cache.commit()
        h, t, logits = first
        B, _, D = h.shape
        experts, weights = m.route(t.view(B, D), logits)
        w = m.expert_weights() if m.streamed is None else m.streamed.resident(experts, hint=h)
        y = None if w is None else m.fused_kernel(t.view(B, D), experts, weights, w, residual=h.view(B, D))
        return m(h) if y is None else y.view(B, 1, D)  # None: biases in another dtype (the torch MoE then)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        if config.position_embedding == "learned":  # GPT-2's absolute positions, in place of RoPE
            self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size, device=device,
                                         dtype=dtype)
        self.block = nn.ModuleList(Block(config, i, device=device, dtype=dtype)
                                   for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size, device=device)
        self.unembedding = Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.checkpointing = False  # training: recompute each block in the backward instead of keeping its inside
        self.bounded_argmax: BoundedArgmax | None = None  # exact greedy tokens from int8 reads (enable_bounded_argmax)
        self.bounded_argmax_wanted = False  # build it at the first greedy decode step (loading.load_model sets it)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def quantize_unembedding(self) -> None:
        """Opt-in: the unembedding as int8 rows with fp32 scales (Int8Linear) — the largest single read of a
        decode step, halved (1.16 of gpt-oss-20b's 3.7 GB per token become 0.58). Inference only."""
        if not isinstance(self.unembedding, Int8Linear):
            self.unembedding = Int8Linear.from_linear(self.unembedding)

    def enable_bounded_argmax(self) -> bool:
        """Opt-in for inference: greedy decode steps read the unembedding as int8 and recompute only the rows that
        can win exactly (BoundedArgmax; the tokens are the full logits' argmax). Costs an int8 copy of the
        unembedding (0.58 GB on gpt-oss). False (nothing done) where it cannot apply: not a bf16 CPU unembedding,
        an int8 unembedding already (quantize_unembedding), or no compiled kernels."""
        w = getattr(self.unembedding, "weight", None)
        if w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu" or kernels.load_kernels() is None:
            return False
        if self.bounded_argmax is None:
            self.bounded_argmax = BoundedArgmax(self.unembedding)
        return True

    def greedy_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """h [M, D] final-normed hidden states → each row's greedy token [M]: exactly `unembedding(h).argmax(-1)`,
        through BoundedArgmax where enabled and applicable."""
        return torch.tensor(self.sample_tokens(h, [None] * h.shape[0]))

    def sample_tokens(self, h: torch.Tensor, rows: Sequence[tuple | None]) -> list[int]:
        """h [M, D] final-normed hidden states → each row's token, as generate.sample draws it from the logits
        `unembedding(h)`: rows[m] None = greedy, else (SamplingParams, generator) of plain temperature sampling
        (no top-k, top-p 1, unconstrained: generate.bounded_ok). Through BoundedArgmax where enabled and
        applicable, else from all logits with the same Gumbel noise: either way the same tokens."""
        from .generate import gumbel_noise, sample

        V = self.unembedding.weight.shape[0] if hasattr(self.unembedding, "weight") else self.config.vocab_size
        temperature = noise = None
        if any(r is not None for r in rows):
            temperature = [0.0 if r is None else r[0].temperature for r in rows]
            noise = torch.stack([torch.zeros(V) if r is None else gumbel_noise(V, r[1], h.device) for r in rows])
        if self.bounded_argmax is None and self.bounded_argmax_wanted:
            self.bounded_argmax_wanted = self.enable_bounded_argmax()  # once: False where it cannot apply
        if self.bounded_argmax is not None:
            tokens = self.bounded_argmax(h, self.unembedding, temperature, noise)
            if tokens is not None:
                return tokens.tolist()
        logits = self.unembedding(h).float()
        return [int(logits[m].argmax()) if r is None else sample(logits[m], r[0], noise=noise[m])
                for m, r in enumerate(rows)]

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] (int) → logits [B, T, V] (fp32), or [B, 1, V] for the last position only (prefill:
        the unembedding is the largest matmul, no use computing it for every prompt token).
        segments [B, T]: document ids of a packed training sequence (attention stays within a document)."""
        x = self.hidden_states(tokens, positions, cache, segments)
        return self.unembedding(x[:, -1:] if last_only else x).float()

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, D]. positions [B, T] default to 0..T-1."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        inv_freq, concentration = yarn_inv_freq(self.config, device=tokens.device)
        cos, sin = rope_cos_sin(positions, inv_freq, concentration)
        x = self.embedding(tokens)  # (B, T, D)
        if self.config.position_embedding == "learned":
            x = x + self.position(positions)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout)
        for i, block in enumerate(self.block):
            if self.checkpointing and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, positions, cos, sin, None, segments, use_reentrant=False)
            else:
                x = block(x, positions, cos, sin, None if cache is None else cache.layer(i), segments)
        return self.norm(x)

    def expert_nbytes(self) -> int:
        """Bytes held by the MXFP4 expert weights (blocks + scales)."""
        return sum(m.nbytes() for m in self.modules() if isinstance(m, MXFP4Weight))

    def dense_experts(self, dtype: torch.dtype = torch.float32) -> "Transformer":
        """Swap every MXFP4 expert stack for a trainable dense one (exact: MXFP4 values fit in bf16/fp32)."""
        for block in self.block:
            for name in ("mlp1_weight", "mlp2_weight"):
                w = getattr(block.mlp, name, None)
                if isinstance(w, MXFP4Weight):
                    setattr(block.mlp, name, DenseExpertWeight.from_mxfp4(w, dtype))
        return self
