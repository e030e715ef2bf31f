// MXFP4 kernels for CPU: a fused dequantize-and-dot for the decode path (never writes a dequantized
// weight), and a fast whole-tensor dequantize for the prefill path (one expert at a time, then a GEMM).
//
// Layout (GPT-oss checkpoints): W[e] is [N, K]; blocks [E, N, K/32, 16] uint8 hold two FP4 e2m1 codes per
// byte (element 2j in the low nibble), scales [E, N, K/32] uint8 hold the block exponent, scale 2^(s-127).
//
// Per block (AVX2): 16 bytes -> 32 int8 of 2·value by one byte shuffle (a 16-entry table), widened to int16
// and multiplied with the activation held as 16-bit fixed point (madd: exact integer products and sums),
// then the block's integer dot product is scaled once into an fp32 accumulator. Rows of x that use the
// same expert share every weight block load and decode.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTOSS_AVX2 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kBytes = 16;
constexpr int kMaxRows = 4;  // rows of x processed together per weight pass (register budget)

// 2 * FP4 value for each code: exact small integers, so the conversion to float is exact.
constexpr int8_t kDoubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
constexpr float kValues[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                               -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

struct ScaleTable {
  float whole[256];  // 2^(s-127)
  ScaleTable() {
    for (int s = 0; s < 256; ++s) whole[s] = std::ldexp(1.0f, s - 127);
  }
};
const ScaleTable kScales;

// Activations as 16-bit fixed point per 32-value block: q = round(x · 2^(14-e)) with 2^e > max|x| of the
// block, so |q| < 2^14 and the rounding error is ≤ 2^-15 of the block's largest |x| (exact for bf16 inputs
// whose block spans < 2^6 in magnitude). Stored in nibble order — the 16 even elements (low nibbles), then
// the 16 odd ones — so a weight block needs no interleaving. Products with the doubled FP4 values (|v| ≤ 12)
// summed over a block stay far inside int32: the block dot product is exact in integers.
// For fp32 activations a second int16 carries the remainder (x ≈ (q + lo·2^-15)·2^(e-14)), which brings the
// error to ≈ 2^-30 of the block max: fp32-level, at the cost of a second multiply-add pass.
struct QuantizedRow {
  std::vector<int16_t> q;    // [G * 32]
  std::vector<int16_t> lo;   // [G * 32] remainders (precise mode only)
  std::vector<float> scale;  // [G]: 2^(e-15) (= 2^(e-14) / 2, the /2 undoing the doubled weights)
};

QuantizedRow quantize_row(const float* x, int64_t groups, bool precise) {
  QuantizedRow row{std::vector<int16_t>(groups * kBlock), std::vector<int16_t>(precise ? groups * kBlock : 0),
                   std::vector<float>(groups)};
  for (int64_t g = 0; g < groups; ++g) {
    const float* xb = x + g * kBlock;
    float amax = 0.f;
    bool finite = true;
    for (int j = 0; j < kBlock; ++j) {
      const float a = std::fabs(xb[j]);
      finite &= a <= std::numeric_limits<float>::max();  // false for NaN and inf
      amax = std::max(amax, a);
    }
    if (!finite) {  // NaN/inf activations propagate, as in a float matmul
      row.scale[g] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    int e = 0;
    std::frexp(amax, &e);  // amax < 2^e
    const float up = std::ldexp(1.0f, 14 - e);
    row.scale[g] = std::ldexp(1.0f, e - 15);
    int16_t* q = row.q.data() + g * kBlock;
    for (int j = 0; j < kBlock; ++j) {
      const int slot = (j % 2) * kBytes + j / 2;  // even elements first, then odd ones
      const float v = xb[j] * up;  // exact: a power-of-two scaling
      const float hi = std::nearbyint(v);
      q[slot] = static_cast<int16_t>(hi);
      if (precise) row.lo[g * kBlock + slot] = static_cast<int16_t>(std::nearbyint((v - hi) * 32768.0f));
    }
  }
  return row;
}

#ifdef GPTOSS_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
#endif

// out[r] = sum_k x[r, k] * W[n, k] for R rows of x sharing this expert, one output row n.
template <int R, bool P>
inline void dot_rows(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const QuantizedRow* const* x,
                     float* result) {
#ifdef GPTOSS_AVX2
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kDoubled)));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // 16 bytes → 32 codes: low nibbles in the lower lane, high nibbles in the upper lane → 2·value as int8
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + g * kBytes)));
    const __m256i codes = _mm256_and_si256(_mm256_blend_epi32(packed, _mm256_srli_epi16(packed, 4), 0xF0), mask);
    const __m256i w8 = _mm256_shuffle_epi8(table, codes);
    const __m256i w_even = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w8));
    const __m256i w_odd = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w8, 1));
    const float wscale = kScales.whole[scales[g]];
    for (int r = 0; r < R; ++r) {
      const int16_t* q = x[r]->q.data() + g * kBlock;
      __m256i dot = _mm256_add_epi32(
          _mm256_madd_epi16(w_even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
          _mm256_madd_epi16(w_odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16))));
      __m256 d = _mm256_cvtepi32_ps(dot);
      if (P) {
        const int16_t* lo = x[r]->lo.data() + g * kBlock;
        __m256i rest = _mm256_add_epi32(
            _mm256_madd_epi16(w_even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
            _mm256_madd_epi16(w_odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 16))));
        d = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rest), _mm256_set1_ps(1.0f / 32768.0f), d);
      }
      acc[r] = _mm256_fmadd_ps(d, _mm256_set1_ps(wscale * x[r]->scale[g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) result[r] = hsum(acc[r]);
#else
  float acc[R] = {0};
  for (int64_t g = 0; g < groups; ++g) {
    const float wscale = kScales.whole[scales[g]];
    const uint8_t* b = blocks + g * kBytes;
    for (int r = 0; r < R; ++r) {
      const int16_t* q = x[r]->q.data() + g * kBlock;
      int32_t dot = 0, rest = 0;
      for (int j = 0; j < kBytes; ++j) dot += kDoubled[b[j] & 0x0F] * q[j] + kDoubled[b[j] >> 4] * q[kBytes + j];
      if (P) {
        const int16_t* lo = x[r]->lo.data() + g * kBlock;
        for (int j = 0; j < kBytes; ++j) rest += kDoubled[b[j] & 0x0F] * lo[j] + kDoubled[b[j] >> 4] * lo[kBytes + j];
      }
      acc[r] += (static_cast<float>(dot) + static_cast<float>(rest) / 32768.0f) * wscale * x[r]->scale[g];
    }
  }
  for (int r = 0; r < R; ++r) result[r] = acc[r];
#endif
}

template <int R, bool P>
void expert_rows(const uint8_t* blocks, const uint8_t* scales, const float* bias, int64_t n_begin,
                 int64_t n_end, int64_t groups, const QuantizedRow* const* x, float* const* out) {
  float result[R];
  for (int64_t n = n_begin; n < n_end; ++n) {
    dot_rows<R, P>(blocks + n * groups * kBytes, scales + n * groups, groups, x, result);
    const float b = bias ? bias[n] : 0.f;
    for (int r = 0; r < R; ++r) out[r][n] = result[r] + b;
  }
}

template <bool P>
void run_rows(int R, const uint8_t* blocks, const uint8_t* scales, const float* bias, int64_t n_begin,
              int64_t n_end, int64_t groups, const QuantizedRow* const* x, float* const* out) {
  switch (R) {
    case 1: return expert_rows<1, P>(blocks, scales, bias, n_begin, n_end, groups, x, out);
    case 2: return expert_rows<2, P>(blocks, scales, bias, n_begin, n_end, groups, x, out);
    case 3: return expert_rows<3, P>(blocks, scales, bias, n_begin, n_end, groups, x, out);
    default: return expert_rows<4, P>(blocks, scales, bias, n_begin, n_end, groups, x, out);
  }
}

}  // namespace

// x [M, K] fp32, blocks [E, N, G, 16] u8, scales [E, N, G] u8, bias [E, N] fp32 (or empty),
// expert_ids [M] int64 -> [M, N] fp32. precise: the two-part activation (for fp32 inputs). Shapes are checked in Python; here only the essentials.
torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, torch::Tensor bias,
                           torch::Tensor expert_ids, bool precise) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [M, K]");
  TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous() && expert_ids.is_contiguous(), "contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), E = blocks.size(0), N = blocks.size(1), G = blocks.size(2);
  TORCH_CHECK(G * kBlock == K, "x has K=", K, " but blocks hold ", G * kBlock, " values per row");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const float* biasp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t* ids = expert_ids.data_ptr<int64_t>();

  // Rows grouped by expert, in chunks of at most kMaxRows: each chunk is one pass over that expert.
  struct Pass { int64_t expert; std::vector<int64_t> rows; };
  std::vector<Pass> passes;
  std::vector<std::vector<int64_t>> by_expert(E);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(ids[m] >= 0 && ids[m] < E, "expert id ", ids[m], " out of range [0, ", E, ")");
    by_expert[ids[m]].push_back(m);
  }
  for (int64_t e = 0; e < E; ++e) {
    for (size_t i = 0; i < by_expert[e].size(); i += kMaxRows) {
      size_t end = std::min(by_expert[e].size(), i + kMaxRows);
      passes.push_back({e, std::vector<int64_t>(by_expert[e].begin() + i, by_expert[e].begin() + end)});
    }
  }
  std::vector<QuantizedRow> quantized(M);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) quantized[m] = quantize_row(xp + m * K, G, precise);
  });
  // One parallel loop over (pass, chunk of output rows): each thread streams its own slice of weights.
  const int64_t chunk = 16;
  const int64_t chunks_per_pass = (N + chunk - 1) / chunk;
  at::parallel_for(0, static_cast<int64_t>(passes.size()) * chunks_per_pass, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Pass& p = passes[i / chunks_per_pass];
      const int64_t n0 = (i % chunks_per_pass) * chunk, n1 = std::min(N, n0 + chunk);
      const QuantizedRow* xr[kMaxRows];
      float* orow[kMaxRows];
      const int R = static_cast<int>(p.rows.size());
      for (int r = 0; r < R; ++r) {
        xr[r] = &quantized[p.rows[r]];
        orow[r] = op + p.rows[r] * N;
      }
      (precise ? run_rows<true> : run_rows<false>)(R, bp + p.expert * N * G * kBytes, sp + p.expert * N * G, biasp ? biasp + p.expert * N : nullptr,
               n0, n1, G, xr, orow);
    }
  });
  return out;
}

// blocks [..., G, 16], scales [..., G] -> [..., G*32] in fp32 or bf16, equal to gptoss.mxfp4.dequantize.
torch::Tensor mxfp4_dequantize(torch::Tensor blocks, torch::Tensor scales, bool bf16) {
  TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous(), "contiguous inputs");
  const int64_t groups = scales.numel();
  std::vector<int64_t> shape(scales.sizes().begin(), scales.sizes().end());
  shape.back() *= kBlock;
  auto out = torch::empty(shape, torch::TensorOptions().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const float scale = kScales.whole[sp[g]];
      const uint8_t* b = bp + g * kBytes;
      float v[kBlock];
      for (int j = 0; j < kBytes; ++j) {
        v[2 * j] = kValues[b[j] & 0x0F] * scale;
        v[2 * j + 1] = kValues[b[j] >> 4] * scale;
      }
      if (bf16) {
        auto* o = out.data_ptr<at::BFloat16>() + g * kBlock;
        for (int j = 0; j < kBlock; ++j) o[j] = at::BFloat16(v[j]);
      } else {
        float* o = out.data_ptr<float>() + g * kBlock;
        for (int j = 0; j < kBlock; ++j) o[j] = v[j];
      }
    }
  });
  return out;
}

bool has_avx2() {
#ifdef GPTOSS_AVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mxfp4_linear", &mxfp4_linear, "fused MXFP4 dequantize + matvec per row's expert");
  m.def("mxfp4_dequantize", &mxfp4_dequantize, "MXFP4 -> fp32/bf16");
  m.def("has_avx2", &has_avx2, "built with the AVX2 path");
}
