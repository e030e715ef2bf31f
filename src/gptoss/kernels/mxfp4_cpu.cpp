// MXFP4 kernels for CPU: a fused dequantize-and-dot for the decode path (reads each 4-bit byte once and
// never writes a dequantized weight) and a fast whole-tensor dequantize for the prefill path.
//
// Layout (GPT-oss checkpoints): expert e's weight W[e] is [N, K]; blocks [E, N, K/32, 16] uint8 hold two FP4
// e2m1 codes per byte (element 2j in the low nibble), scales [E, N, K/32] uint8 the block exponent, 2^(s-127).
//
// The Python side (kernels/__init__.py) validates every argument and allocates the outputs; this file trusts
// what it gets. The interface is raw pointers through the plain Python C API: no pybind11 and no torch
// tensor headers, so the first-use build takes seconds instead of a minute.
//
// AVX2 decode of one 32-value block: the 32 nibbles index two 16-byte tables (vpshufb) holding the low and
// high byte of value · 2^(s-127) as bf16, one pair of tables per block scale s (8 KiB in all; exact: e2m1
// values have 2 significant bits and bf16 has fp32's exponent range). Interleaving the two gives bf16 words,
// and a bf16 word shifted (or masked) into the top half of a 32-bit lane is that fp32 value: no int->float
// conversion and no per-block scale multiply. Activations stay fp32, pre-permuted once per call into the
// order the decode produces, so a block costs 4 FMAs per activation row — the products are exactly the
// reference's w·x, only the summation order differs.

#include <Python.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTOSS_AVX2 1
#endif

namespace {

constexpr int kBlock = 32;  // values per block
constexpr int kBytes = 16;  // bytes per block
constexpr int kMaxRows = 8;  // rows of x sharing one pass over an expert's weights (register budget)
constexpr int64_t kRowsPerTask = 16;  // output rows per parallel work item

enum DType : int64_t { kF32 = 0, kBF16 = 1 };

constexpr float kValues[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                               -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

struct Tables {
  float scale[256];      // 2^(s-127) as fp32: denormal for s = 0, inf for s = 255 — what the reference does
  float dot_scale[256];  // the same with NaN for s = 255, the OCP spec's NaN scale (the reference's 0·inf)
  alignas(16) uint8_t bf16_lo[16];  // low / high byte of each code's value as bf16
  alignas(16) uint8_t bf16_hi[16];
  alignas(16) uint8_t scaled[256][2][16];  // [s][low/high byte][code]: value · dot_scale[s] as bf16
  Tables() {
    for (int s = 0; s < 256; ++s) dot_scale[s] = scale[s] = std::ldexp(1.0f, s - 127);
    dot_scale[255] = std::numeric_limits<float>::quiet_NaN();
    auto split = [](float v, uint8_t* lo, uint8_t* hi) {  // exact: every value here is a bf16 value
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      *lo = (bits >> 16) & 0xFF;
      *hi = bits >> 24;
    };
    for (int c = 0; c < 16; ++c) {
      split(kValues[c], &bf16_lo[c], &bf16_hi[c]);
      for (int s = 0; s < 256; ++s) split(kValues[c] * dot_scale[s], &scaled[s][0][c], &scaled[s][1][c]);
    }
  }
};
const Tables kTables;

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_float(const void* p, int64_t dtype, int64_t i) {
  return dtype == kBF16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// fp32 -> bf16 for values that bf16 holds exactly (all dequantized MXFP4 values): truncation, NaN -> 0x7FC0.
inline uint16_t float_to_bf16_exact(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

// Position p of a permuted 32-value activation block holds element activation_element(p) (see Decoder).
inline int activation_element(int p) {
#ifdef GPTOSS_AVX2
  const int j = p & 3, lane = (p >> 2) & 1, word_parity = (p >> 3) & 1, half = p >> 4;
  return 2 * (half * 8 + 2 * j + word_parity) + lane;  // byte index * 2 + nibble
#else
  return p;
#endif
}

#ifdef GPTOSS_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

struct Decoder {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));

  // 16 bytes with scale s -> 32 fp32 weights in activation order: f[2u + w] lane l slot j is nibble l (0 low,
  // 1 high) of byte 8u + 2j + w. The variable shift puts the low nibbles in the lower 128-bit lane and the
  // high ones in the upper (one op instead of shift + blend); vpshufb only reads the low 4 bits after the mask.
  inline void decode(const uint8_t* b, uint8_t s, __m256* f) const {
    const auto* table = reinterpret_cast<const __m128i*>(kTables.scaled[s]);
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_load_si128(table));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_load_si128(table + 1));
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(packed, shift), nibble);
    const __m256i l = _mm256_shuffle_epi8(lo, codes), h = _mm256_shuffle_epi8(hi, codes);
    const __m256i w0 = _mm256_unpacklo_epi8(l, h), w1 = _mm256_unpackhi_epi8(l, h);  // bf16 words
    f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));  // even words
    f[1] = _mm256_castsi256_ps(_mm256_and_si256(w0, top));  // odd words, already in the top half
    f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    f[3] = _mm256_castsi256_ps(_mm256_and_si256(w1, top));
  }
};

// sums[r] = dot(W[n], x[r]) for R activation rows and one weight row (blocks, scales point at row n): each
// weight block is decoded once for all R rows. A accumulators per row keep the FMA latency off the critical
// path within the 16 ymm registers.
template <int R>
inline void dot_rows(const Decoder& d, const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                     const float* const* x, float* sums) {
  constexpr int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 f[4];
    d.decode(blocks + g * kBytes, scales[g], f);
    for (int r = 0; r < R; ++r) {
      const float* xg = x[r] + g * kBlock;
      for (int i = 0; i < 4; ++i) acc[r][i % A] = _mm256_fmadd_ps(f[i], _mm256_loadu_ps(xg + 8 * i), acc[r][i % A]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 a = acc[r][0];
    for (int i = 1; i < A; ++i) a = _mm256_add_ps(a, acc[r][i]);
    sums[r] = hsum(a);
  }
}
#else
struct Decoder {};

template <int R>
inline void dot_rows(const Decoder&, const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                     const float* const* x, float* sums) {
  float acc[R] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = blocks + g * kBytes;
    const float s = kTables.dot_scale[scales[g]];
    for (int r = 0; r < R; ++r) {
      const float* xg = x[r] + g * kBlock;
      for (int j = 0; j < kBytes; ++j)
        acc[r] += (kValues[b[j] & 0x0F] * s) * xg[2 * j] + (kValues[b[j] >> 4] * s) * xg[2 * j + 1];
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = acc[r];
}
#endif

// One pass: R rows of x that use the same expert, output rows [n0, n1). Every weight row re-reads the R
// activation rows, so K is walked in chunks whose activations stay in L1 (~16 KiB); with more rows than
// that the loads would come from L2 and cost more than the decode.
template <int R>
void pass_rows(const uint8_t* blocks, const uint8_t* scales, const float* bias, int64_t n0, int64_t n1,
               int64_t groups, const float* const* x, float* const* out) {
  const Decoder d;
  constexpr int64_t chunk = std::max<int64_t>(8, 16384 / (R * kBlock * sizeof(float)));  // blocks
  for (int r = 0; r < R; ++r)
    for (int64_t n = n0; n < n1; ++n) out[r][n] = bias ? bias[n] : 0.f;
  float sums[R];
  for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
    const int64_t g1 = std::min(groups, g0 + chunk);
    const float* xc[R];
    for (int r = 0; r < R; ++r) xc[r] = x[r] + g0 * kBlock;
    for (int64_t n = n0; n < n1; ++n) {
      dot_rows<R>(d, blocks + (n * groups + g0) * kBytes, scales + n * groups + g0, g1 - g0, xc, sums);
      for (int r = 0; r < R; ++r) out[r][n] += sums[r];
    }
  }
}

using PassFn = void (*)(const uint8_t*, const uint8_t*, const float*, int64_t, int64_t, int64_t,
                        const float* const*, float* const*);
constexpr PassFn kPassFns[kMaxRows] = {pass_rows<1>, pass_rows<2>, pass_rows<3>, pass_rows<4>,
                                       pass_rows<5>, pass_rows<6>, pass_rows<7>, pass_rows<8>};

// out[m] = x[m] @ W[ids[m]].T + bias[ids[m]] (fp32). x, bias: fp32 or bf16 (bias may be null).
void linear(const void* x, int64_t x_dtype, int64_t M, int64_t K, const uint8_t* blocks, const uint8_t* scales,
            int64_t E, int64_t N, const void* bias, int64_t bias_dtype, const int64_t* ids, float* out) {
  const int64_t G = K / kBlock;
  // Activations in fp32 and decode order, once per call (M·K values: small next to the weights).
  std::vector<float> xs(static_cast<size_t>(M * K));
  int order[kBlock];
  for (int p = 0; p < kBlock; ++p) order[p] = activation_element(p);
  for (int64_t i = 0; i < M * G; ++i) {  // one 32-value block of one row at a time
    float* dst = xs.data() + i * kBlock;
    if (x_dtype == kBF16) {
      const uint16_t* src = static_cast<const uint16_t*>(x) + i * kBlock;
      for (int p = 0; p < kBlock; ++p) dst[p] = bf16_to_float(src[order[p]]);
    } else {
      const float* src = static_cast<const float*>(x) + i * kBlock;
      for (int p = 0; p < kBlock; ++p) dst[p] = src[order[p]];
    }
  }
  // Rows grouped by expert in chunks of at most kMaxRows: each chunk is one pass over that expert.
  struct Pass {
    int64_t expert;
    int rows;
    const float* x[kMaxRows];
    float* out[kMaxRows];
    std::vector<float> bias;  // bias[expert] as fp32, empty if none
  };
  std::vector<std::vector<int64_t>> by_expert(E);
  for (int64_t m = 0; m < M; ++m) by_expert[ids[m]].push_back(m);
  std::vector<Pass> passes;
  for (int64_t e = 0; e < E; ++e) {
    for (size_t i = 0; i < by_expert[e].size(); i += kMaxRows) {
      Pass p{e, static_cast<int>(std::min<size_t>(kMaxRows, by_expert[e].size() - i)), {}, {}, {}};
      for (int r = 0; r < p.rows; ++r) {
        const int64_t m = by_expert[e][i + r];
        p.x[r] = xs.data() + m * K;
        p.out[r] = out + m * N;
      }
      if (bias) {
        p.bias.resize(N);
        for (int64_t n = 0; n < N; ++n) p.bias[n] = load_float(bias, bias_dtype, e * N + n);
      }
      passes.push_back(std::move(p));
    }
  }
  // One flat parallel loop over (pass, slice of output rows): each thread streams a contiguous range of
  // weight rows. Tiny problems (< ~64 KiB of weights) stay on the calling thread.
  const int64_t tasks_per_pass = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t bytes_per_task = std::max<int64_t>(1, std::min(N, kRowsPerTask) * G * (kBytes + 1));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / bytes_per_task);
  at::parallel_for(0, static_cast<int64_t>(passes.size()) * tasks_per_pass, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Pass& p = passes[i / tasks_per_pass];
      const int64_t n0 = (i % tasks_per_pass) * kRowsPerTask, n1 = std::min(N, n0 + kRowsPerTask);
      kPassFns[p.rows - 1](blocks + p.expert * N * G * kBytes, scales + p.expert * N * G,
                           p.bias.empty() ? nullptr : p.bias.data(), n0, n1, G, p.x, p.out);
    }
  });
}

// blocks [groups, 16], scales [groups] -> out [groups * 32] (fp32 or bf16), equal to mxfp4.dequantize:
// value · 2^(s-127) as one fp32 multiply by the same power of two, exact in bf16 too.
void dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t groups, void* out, int64_t out_dtype) {
  at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
    int64_t g = begin;
#ifdef GPTOSS_AVX2
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kTables.bf16_lo)));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kTables.bf16_hi)));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i bf16_nan = _mm256_set1_epi32(0x7FC0);
    // 16 fp32 values -> 16 bf16: the top halves (exact values), NaN as 0x7FC0 like c10::BFloat16
    auto to_bf16 = [&](__m256 a, __m256 b) {
      auto half = [&](__m256 v) {
        const __m256i t = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
        return _mm256_blendv_epi8(t, bf16_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      };
      return _mm256_permute4x64_epi64(_mm256_packus_epi32(half(a), half(b)), 0xD8);  // undo the in-lane pack
    };
    for (; g < end; ++g) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + g * kBytes));
      const __m128i l4 = _mm_and_si128(packed, nibble), h4 = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
      // codes in element order: elements 0..15 in the lower lane, 16..31 in the upper
      const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(l4, h4), _mm_unpacklo_epi8(l4, h4));
      const __m256i l = _mm256_shuffle_epi8(lo, codes), h = _mm256_shuffle_epi8(hi, codes);
      const __m256i w0 = _mm256_unpacklo_epi8(l, h), w1 = _mm256_unpackhi_epi8(l, h);  // 0..7|16..23, 8..15|24..31
      const __m256i a = _mm256_unpacklo_epi16(zero, w0), b = _mm256_unpackhi_epi16(zero, w0);
      const __m256i c = _mm256_unpacklo_epi16(zero, w1), d = _mm256_unpackhi_epi16(zero, w1);
      const __m256 s = _mm256_set1_ps(kTables.scale[scales[g]]);
      const __m256 v0 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_permute2x128_si256(a, b, 0x20)), s);  // 0..7
      const __m256 v1 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_permute2x128_si256(c, d, 0x20)), s);  // 8..15
      const __m256 v2 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_permute2x128_si256(a, b, 0x31)), s);  // 16..23
      const __m256 v3 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_permute2x128_si256(c, d, 0x31)), s);  // 24..31
      if (out_dtype == kBF16) {
        __m256i* o = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + g * kBlock);
        _mm256_storeu_si256(o, to_bf16(v0, v1));
        _mm256_storeu_si256(o + 1, to_bf16(v2, v3));
      } else {
        float* o = static_cast<float*>(out) + g * kBlock;
        _mm256_storeu_ps(o, v0);
        _mm256_storeu_ps(o + 8, v1);
        _mm256_storeu_ps(o + 16, v2);
        _mm256_storeu_ps(o + 24, v3);
      }
    }
#endif
    for (; g < end; ++g) {
      const float s = kTables.scale[scales[g]];
      const uint8_t* b = blocks + g * kBytes;
      for (int j = 0; j < kBytes; ++j) {
        const float v0 = kValues[b[j] & 0x0F] * s, v1 = kValues[b[j] >> 4] * s;
        if (out_dtype == kBF16) {
          uint16_t* o = static_cast<uint16_t*>(out) + g * kBlock + 2 * j;
          o[0] = float_to_bf16_exact(v0);
          o[1] = float_to_bf16_exact(v1);
        } else {
          float* o = static_cast<float*>(out) + g * kBlock + 2 * j;
          o[0] = v0;
          o[1] = v1;
        }
      }
    }
  });
}

// ---------------------------------------------------------------- bf16 weights, few rows (decode)
// out[m] = x[m] @ W.T + bias for a bf16 W [N, K] and M ≤ 4 fp32 rows x: the attention projections, the
// router and the unembedding while decoding. torch's bf16 GEMM on CPUs without native bf16 arithmetic goes
// through conversion paths that reach about two thirds of the memory bandwidth; here a bf16 word shifted into
// the top half of a 32-bit lane is its fp32 value, so each weight costs one shift and one FMA per row.
template <int R>
void bf16_rows(const float* x, int64_t K, const uint16_t* w, const void* bias, int64_t bias_dtype, int64_t n0,
               int64_t n1, int64_t N, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    float sums[R];
    int64_t k = 0;
#ifdef GPTOSS_AVX2
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + k))), 16));
      const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + k + 8))), 16));
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) sums[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int r = 0; r < R; ++r) sums[r] = 0.f;
#endif
    for (; k < K; ++k) {
      const float wk = bf16_to_float(wn[k]);
      for (int r = 0; r < R; ++r) sums[r] += wk * x[r * K + k];
    }
    const float b = bias ? load_float(bias, bias_dtype, n) : 0.f;
    for (int r = 0; r < R; ++r) out[r * N + n] = sums[r] + b;
  }
}

constexpr int kBf16MaxRows = 4;
using Bf16Fn = void (*)(const float*, int64_t, const uint16_t*, const void*, int64_t, int64_t, int64_t, int64_t,
                        float*);
constexpr Bf16Fn kBf16Fns[kBf16MaxRows] = {bf16_rows<1>, bf16_rows<2>, bf16_rows<3>, bf16_rows<4>};

void bf16_linear(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const void* bias,
                 int64_t bias_dtype, float* out) {
  const int64_t rows_per_task = 64;
  const int64_t tasks = (N + rows_per_task - 1) / rows_per_task;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows_per_task * K * 2));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * rows_per_task, n1 = std::min(N, end * rows_per_task);
    for (int64_t m = 0; m < M; m += kBf16MaxRows) {
      const int64_t r = std::min<int64_t>(kBf16MaxRows, M - m);
      kBf16Fns[r - 1](x + m * K, K, w, bias, bias_dtype, n0, n1, N, out + m * N);
    }
  });
}

// ---------------------------------------------------------------- Python bindings (the plain C API)
template <typename F>
PyObject* run_without_gil(F&& f) {
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    f();
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown C++ exception";
  }
  Py_END_ALLOW_THREADS
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

template <typename T>
T* ptr(long long address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

PyObject* py_linear(PyObject*, PyObject* args) {
  long long x, x_dtype, M, K, blocks, scales, E, N, bias, bias_dtype, ids, out;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLL", &x, &x_dtype, &M, &K, &blocks, &scales, &E, &N, &bias, &bias_dtype,
                        &ids, &out))
    return nullptr;
  return run_without_gil([&] {
    linear(ptr<const void>(x), x_dtype, M, K, ptr<const uint8_t>(blocks), ptr<const uint8_t>(scales), E, N,
           ptr<const void>(bias), bias_dtype, ptr<const int64_t>(ids), ptr<float>(out));
  });
}

PyObject* py_dequantize(PyObject*, PyObject* args) {
  long long blocks, scales, groups, out, out_dtype;
  if (!PyArg_ParseTuple(args, "LLLLL", &blocks, &scales, &groups, &out, &out_dtype)) return nullptr;
  return run_without_gil([&] {
    dequantize(ptr<const uint8_t>(blocks), ptr<const uint8_t>(scales), groups, ptr<void>(out), out_dtype);
  });
}

PyObject* py_bf16_linear(PyObject*, PyObject* args) {
  long long x, M, K, w, N, bias, bias_dtype, out;
  if (!PyArg_ParseTuple(args, "LLLLLLLL", &x, &M, &K, &w, &N, &bias, &bias_dtype, &out)) return nullptr;
  return run_without_gil([&] {
    bf16_linear(ptr<const float>(x), M, K, ptr<const uint16_t>(w), N, ptr<const void>(bias), bias_dtype,
                ptr<float>(out));
  });
}

PyObject* py_simd(PyObject*, PyObject*) {
#ifdef GPTOSS_AVX2
  return PyUnicode_FromString("avx2");
#else
  return PyUnicode_FromString("scalar");
#endif
}

PyMethodDef kMethods[] = {
    {"linear", py_linear, METH_VARARGS,
     "linear(x, x_dtype, M, K, blocks, scales, E, N, bias, bias_dtype, expert_ids, out): data pointers"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(blocks, scales, groups, out, out_dtype): data pointers"},
    {"bf16_linear", py_bf16_linear, METH_VARARGS,
     "bf16_linear(x_f32, M, K, w_bf16, N, bias, bias_dtype, out_f32): data pointers"},
    {"simd", py_simd, METH_NOARGS, "the instruction set this build uses: 'avx2' or 'scalar'"},
    {nullptr, nullptr, 0, nullptr}};

#define GPTOSS_STR2(x) #x
#define GPTOSS_STR(x) GPTOSS_STR2(x)
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, GPTOSS_STR(TORCH_EXTENSION_NAME), "gptoss MXFP4 CPU kernels", -1,
                       kMethods};

}  // namespace

#define GPTOSS_PYINIT2(name) PyInit_##name
#define GPTOSS_PYINIT(name) GPTOSS_PYINIT2(name)
PyMODINIT_FUNC GPTOSS_PYINIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
