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
// reference's w·x, only the summation order differs. AVX-512 has two more decodes: an fp32 table lookup per
// 16 weights (dot_rows_lut) and bf16 words for vdpbf16ps (dot_rows_bf16); use_vdpbf16ps says which runs where.

#include <Python.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTOSS_AVX2 1
// AVX-512 BF16 (Zen 4, Sapphire Rapids and later): vdpbf16ps multiplies bf16 pairs exactly and accumulates in
// fp32, so bf16 activations need no conversion at all. Like every dpbf16 instruction it reads subnormal
// inputs as zero: weights below 2^-126 (block scales 0 and 1) and activations below 2^-126 count as 0.
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define GPTOSS_AVX512BF16 1
#endif
// AVX-512F: the experts' fp32 lookup kernel (dot_rows_lut), 32 weights per two vpermps.
#if defined(__AVX512F__)
#define GPTOSS_AVX512 1
#endif
// AMX (Intel Sapphire Rapids and later): tile multiplies for experts with several rows (amx_pass).
#if defined(GPTOSS_AVX512BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define GPTOSS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
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
  alignas(32) uint16_t scaled_words[256][16];  // [s][code]: the same as bf16 words (vpermw tables)
  alignas(64) float lut[256][16];  // [s][code]: value · dot_scale[s] as fp32 (vpermps tables; exact)
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
      for (int s = 0; s < 256; ++s) {
        split(kValues[c] * dot_scale[s], &scaled[s][0][c], &scaled[s][1][c]);
        scaled_words[s][c] = static_cast<uint16_t>(scaled[s][0][c] | (scaled[s][1][c] << 8));
        lut[s][c] = kValues[c] * dot_scale[s];
      }
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

inline uint16_t float_to_bf16_rne(float f) {  // c10::BFloat16's rounding: nearest even, NaN -> 0x7FC0
  if (std::isnan(f)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Row e of an [E, N] bias of bias_dtype (null stays null).
inline const void* expert_bias(const void* bias, int64_t bias_dtype, int64_t e, int64_t N) {
  return bias ? static_cast<const uint8_t*>(bias) + e * N * (bias_dtype == kBF16 ? 2 : 4) : nullptr;
}
inline float round_to(float f, int64_t dtype) { return dtype == kBF16 ? bf16_to_float(float_to_bf16_rne(f)) : f; }

inline void store_float(void* p, int64_t dtype, int64_t i, float f) {
  if (dtype == kBF16) static_cast<uint16_t*>(p)[i] = float_to_bf16_rne(f);
  else static_cast<float*>(p)[i] = f;
}

// Tasks [0, n) split in one contiguous range per thread, each range claimed task by task from its own
// counter: a thread streams its range front to back, and when it is done it takes the remaining tasks of the
// others (as ggml's matmuls do, roughly), instead of waiting for them. On a shared machine one core is often
// slower than the other for a while; a static split then leaves the fast one idle at the end of every matmul.
// Tasks stay in order within a range: handing them out one by one to alternate threads (one shared counter)
// breaks the streams the hardware prefetcher follows and measured 1.7x slower. serial: no threads.
template <typename F>
void parallel_tasks(int64_t n, bool serial, const F& task) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
  if (serial || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) task(i);
    return;
  }
  std::vector<std::atomic<int64_t>> next(threads);
  std::vector<int64_t> end(threads);
  for (int t = 0; t < threads; ++t) {
    next[t] = n * t / threads;
    end[t] = n * (t + 1) / threads;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t stop) {
    for (int64_t self = begin; self < stop; ++self)
      for (int k = 0; k < threads; ++k) {  // its own range first, then the others'
        const int r = static_cast<int>((self + k) % threads);
        for (int64_t i = next[r].fetch_add(1, std::memory_order_relaxed); i < end[r];
             i = next[r].fetch_add(1, std::memory_order_relaxed))
          task(i);
      }
  });
}

// The two AVX-512 CPUs measured differ (benchmarks/RESULTS.md). AMD's Zen 4 issues vdpbf16ps every cycle, so
// bf16 activations multiply bf16 weights directly (dot_rows_bf16: 2.5 cycles a block), and software prefetch
// there only costs. The Intel Xeon measured (AMX generation) issues vdpbf16ps once per 2 cycles (8 cycles
// latency): the bf16 expert kernel took 7 core cycles a block, the fp32 lookup kernel (dot_rows_lut,
// activations widened to fp32 once per call) 4; and software prefetch brings its kernels closer to DRAM speed.
// -DGPTOSS_EXPERTS_DP=0/1 forces the choice (tests build both).
inline bool cpu_is_amd() {
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

// Software prefetch of weight streams (dot_rows_lut, bf16_rows_512): how far ahead, and into which cache.
// Into L2 (T2) rather than L1: L1's few fill buffers then stay free for the demand loads (C++ test, 2 threads
// from DRAM on the Xeon: 17.0 -> 19.8 GB/s for 4 KiB into L2 vs 2 KiB into L1). -D overrides for A/B runs.
#ifndef GPTOSS_STREAM_AHEAD
#define GPTOSS_STREAM_AHEAD 4096
#endif
#ifndef GPTOSS_STREAM_HINT
#define GPTOSS_STREAM_HINT _MM_HINT_T2
#endif
#ifdef GPTOSS_AVX2
constexpr int64_t kStreamAhead = GPTOSS_STREAM_AHEAD;  // bytes
constexpr auto kStreamHint = GPTOSS_STREAM_HINT;
#endif

inline bool use_vdpbf16ps() {
#if !defined(GPTOSS_AVX512BF16)
  return false;
#elif defined(GPTOSS_EXPERTS_DP)
  return GPTOSS_EXPERTS_DP;
#else
  return cpu_is_amd();
#endif
}

// Position p of a permuted 32-value activation block holds element activation_element(p) (see Decoder and
// dot_rows_lut).
inline int activation_element(int p) {
#if defined(GPTOSS_AVX512)
  const int half = p >> 4, lane = (p >> 2) & 3, dword = p & 3;
  return 8 * dword + 4 * half + lane;  // nibble 4·half + lane of the block's dword `dword`
#elif defined(GPTOSS_AVX2)
  const int j = p & 3, lane = (p >> 2) & 1, word_parity = (p >> 3) & 1, half = p >> 4;
  return 2 * (half * 8 + 2 * j + word_parity) + lane;  // byte index * 2 + nibble
#else
  return p;
#endif
}

// The same for the bf16 kernel (dot_rows_bf16): the 16 even elements, then the 16 odd ones.
inline int activation_element_bf16(int p) { return p < 16 ? 2 * p : 2 * (p - 16) + 1; }

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
#endif

#ifdef GPTOSS_AVX512BF16
// One block's 32 weights as exact bf16 words: the 16 bytes widen to 16-bit lanes, and the low (even) and the
// high (odd) nibbles index the block scale's 16-word table (vpermw: value · 2^(s-127) as bf16, exact; it reads
// only an index's low 4 bits). dot_rows_bf16 and the AMX tiles both decode this way.
inline void decode_bf16_words(const uint8_t* block, uint8_t scale, __m256i& even, __m256i& odd) {
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
  const __m256i table = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.scaled_words[scale]));
  even = _mm256_permutexvar_epi16(bytes, table);
  odd = _mm256_permutexvar_epi16(_mm256_srli_epi16(bytes, 4), table);
}

// bf16 activations (the model's bf16 mode) on AVX-512 BF16: each block decoded by decode_bf16_words, and two
// vdpbf16ps multiply the 32 bf16 weights by the activations, exactly, summing pairs in fp32.
template <int R>
inline void dot_rows_bf16(const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                          const uint16_t* const* x, float* sums) {
  // Two accumulators per row and block (even, odd words), and U blocks per step: at least eight independent
  // chains, or vdpbf16ps's latency (not the decode) sets the pace.
  constexpr int U = R == 1 ? 4 : R <= 3 ? 2 : 1;
  __m256 acc[R][2 * U];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < 2 * U; ++a) acc[r][a] = _mm256_setzero_ps();
  auto step = [&](int64_t g, int a) {
    __m256i even, odd;
    decode_bf16_words(blocks + g * kBytes, scales[g], even, odd);
    for (int r = 0; r < R; ++r) {
      const __m256i* xg = reinterpret_cast<const __m256i*>(x[r] + g * kBlock);
      acc[r][a] = _mm256_dpbf16_ps(acc[r][a], (__m256bh)even, (__m256bh)_mm256_loadu_si256(xg));
      acc[r][a + 1] = _mm256_dpbf16_ps(acc[r][a + 1], (__m256bh)odd, (__m256bh)_mm256_loadu_si256(xg + 1));
    }
  };
  int64_t g = 0;
  for (; g + U <= groups; g += U) {
    for (int u = 0; u < U; ++u) step(g + u, 2 * u);
  }
  for (; g < groups; ++g) step(g, 0);
  for (int r = 0; r < R; ++r) {
    __m256 a = acc[r][0];
    for (int i = 1; i < 2 * U; ++i) a = _mm256_add_ps(a, acc[r][i]);
    sums[r] = hsum(a);
  }
}
#endif

#ifdef GPTOSS_AVX512
// fp32 activations on AVX-512: the block's 16 bytes are broadcast to the four 128-bit lanes, a per-lane
// variable shift brings nibble L (lane L) or 4 + L of each dword down to the low bits, and those index the
// block scale's 16-entry fp32 table (vpermps reads only an index's low 4 bits): 2 shifts, 2 lookups and 2 FMAs
// per 32 weights and row, no conversion. The products are exactly the reference's w·x (fp32 FMA, subnormal
// scales included). Loads are prefetched in software (kStreamAhead): a compute-bound kernel does not issue
// them early enough for the hardware prefetcher alone (the Xeon, 2 threads: 12.5 -> 15 GB/s from DRAM).
template <int R>
inline void dot_rows_lut(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const float* const* x,
                         float* sums) {
  constexpr int U = R == 1 ? 2 : 1;  // blocks per step: at least four independent FMA chains
  const __m512i shift_lo = _mm512_set_epi32(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
  const __m512i shift_hi = _mm512_add_epi32(shift_lo, _mm512_set1_epi32(16));
  __m512 acc[R][2 * U];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < 2 * U; ++a) acc[r][a] = _mm512_setzero_ps();
  auto step = [&](int64_t g, int a) {
    if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(blocks + g * kBytes + kStreamAhead), kStreamHint);
    const __m512i packed = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + g * kBytes)));
    const __m512 table = _mm512_load_ps(kTables.lut[scales[g]]);
    const __m512 w0 = _mm512_permutexvar_ps(_mm512_srlv_epi32(packed, shift_lo), table);
    const __m512 w1 = _mm512_permutexvar_ps(_mm512_srlv_epi32(packed, shift_hi), table);
    for (int r = 0; r < R; ++r) {
      const float* xg = x[r] + g * kBlock;
      acc[r][a] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), acc[r][a]);
      acc[r][a + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), acc[r][a + 1]);
    }
  };
  int64_t g = 0;
  for (; g + U <= groups; g += U)
    for (int u = 0; u < U; ++u) step(g + u, 2 * u);
  for (; g < groups; ++g) step(g, 0);
  for (int r = 0; r < R; ++r) {
    __m512 a = acc[r][0];
    for (int i = 1; i < 2 * U; ++i) a = _mm512_add_ps(a, acc[r][i]);
    sums[r] = _mm512_reduce_add_ps(a);
  }
}
#endif

#ifndef GPTOSS_AVX2
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
// that the loads would come from L2 and cost more than the decode. T: the activations' type in the kernel,
// float (permuted for Decoder) or uint16_t (bf16 words, permuted for dot_rows_bf16).
template <int R, typename T>
void pass_rows(const uint8_t* blocks, const uint8_t* scales, const void* bias, int64_t bias_dtype, int64_t n0, int64_t n1,
               int64_t groups, const void* const* x, float* const* out) {
  constexpr int64_t chunk = std::max<int64_t>(8, 16384 / (R * kBlock * sizeof(T)));  // blocks
  for (int r = 0; r < R; ++r)
    for (int64_t n = n0; n < n1; ++n) out[r][n] = bias ? load_float(bias, bias_dtype, n) : 0.f;
  float sums[R];
  for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
    const int64_t g1 = std::min(groups, g0 + chunk);
    const T* xc[R];
    for (int r = 0; r < R; ++r) xc[r] = static_cast<const T*>(x[r]) + g0 * kBlock;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* b = blocks + (n * groups + g0) * kBytes;
      const uint8_t* s = scales + n * groups + g0;
#ifdef GPTOSS_AVX512BF16
      if constexpr (std::is_same_v<T, uint16_t>) dot_rows_bf16<R>(b, s, g1 - g0, xc, sums);
      else
#endif
#ifdef GPTOSS_AVX512
        dot_rows_lut<R>(b, s, g1 - g0, reinterpret_cast<const float* const*>(xc), sums);
#else
        dot_rows<R>(Decoder{}, b, s, g1 - g0, reinterpret_cast<const float* const*>(xc), sums);
#endif
      for (int r = 0; r < R; ++r) out[r][n] += sums[r];
    }
  }
}

using PassFn = void (*)(const uint8_t*, const uint8_t*, const void*, int64_t, int64_t, int64_t, int64_t,
                        const void* const*, float* const*);
template <typename T>
constexpr PassFn kPassFns[kMaxRows] = {pass_rows<1, T>, pass_rows<2, T>, pass_rows<3, T>, pass_rows<4, T>,
                                       pass_rows<5, T>, pass_rows<6, T>, pass_rows<7, T>, pass_rows<8, T>};

#ifdef GPTOSS_AMX
// Experts with several rows of x on AMX. The fused kernels above multiply on the vector units, once per row
// of x: with 16 rows per expert they cost 4x a decode pass, and dequantizing the expert for a oneDNN GEMM
// writes and re-reads its whole bf16 copy (33 MB for a 20b mlp1) however few rows use it. Here each 16x32
// piece of the weight (16 output rows, one block each) is decoded into an L1 tile buffer (the vpermw tables of
// dot_rows_bf16) and multiplied by up to 6 tiles of 16 rows of x (tdpbf16ps: exact bf16 products, fp32 sums,
// subnormals as zero like vdpbf16ps and oneDNN's AMX GEMM). The weights are read once per 96 rows of x.
constexpr int kAmxTokens = 16;     // rows of x per tile (the B and C tiles' columns)
constexpr int kAmxMaxTiles = 6;    // accumulating tiles per pass (of 8: the weights and x take two)
constexpr int64_t kAmxRowsPerTask = 64;  // output rows per parallel work item
// Experts with at least this many rows of x take the tiles (below: the vector kernels). The Xeon measured,
// 2 threads, 32 experts x n rows of a 20b mlp1, tiles vs vector kernels: n = 2: 24 vs 19 ms, 3: 24 vs 23,
// 4: 24 vs 31, 6: 24 vs 45, 8: 27 vs 59 (dequantize + oneDNN GEMM: 111). -D overrides for A/B runs.
#ifndef GPTOSS_AMX_MIN_ROWS
#define GPTOSS_AMX_MIN_ROWS 3
#endif

// Linux grants the AMX tile state only on request, once per process (arch_prctl ARCH_REQ_XCOMP_PERM).
inline bool amx_ready() {
  static const bool ready = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The rows of x of one pass (bf16 words, natural order) as B tiles: tile (j, g) is 16 lines of 64 bytes, line
// r holding, for each of the 16 rows j·16 + c, the words of the elements that the decoded weight words 2r and
// 2r + 1 stand for (activation_element_bf16: even elements, then odd ones). Rows past the pass are zero.
void pack_amx(const uint16_t* const* x, int rows, int64_t G, uint16_t* packed) {
  const int tiles = (rows + kAmxTokens - 1) / kAmxTokens;
  for (int j = 0; j < tiles; ++j)
    for (int64_t g = 0; g < G; ++g) {
      uint16_t* tile = packed + (j * G + g) * 512;
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < kAmxTokens; ++c) {
          const int row = j * kAmxTokens + c;
          for (int h = 0; h < 2; ++h)
            tile[r * 32 + 2 * c + h] = row < rows ? x[row][g * kBlock + activation_element_bf16(2 * r + h)] : 0;
        }
    }
}

// Tile numbers are literals in GCC's intrinsics (pasted into the assembly): tiles 0-5 accumulate, 6 holds the
// decoded weights, 7 the rows of x; the per-tile steps pick their literal at compile time.
#define GPTOSS_TILE_CASES(op) \
  if constexpr (J == 0) op(0); else if constexpr (J == 1) op(1); else if constexpr (J == 2) op(2); \
  else if constexpr (J == 3) op(3); else if constexpr (J == 4) op(4); else op(5);
template <int J>
inline void amx_zero() {
#define GPTOSS_OP(t) _tile_zero(t)
  GPTOSS_TILE_CASES(GPTOSS_OP)
#undef GPTOSS_OP
}
template <int J>
inline void amx_step(const uint16_t* x_tile) {
  _tile_loadd(7, x_tile, 64);
#define GPTOSS_OP(t) _tile_dpbf16ps(t, 6, 7)
  GPTOSS_TILE_CASES(GPTOSS_OP)
#undef GPTOSS_OP
}
template <int J>
inline void amx_store(float* c) {
#define GPTOSS_OP(t) _tile_stored(t, c, 64)
  GPTOSS_TILE_CASES(GPTOSS_OP)
#undef GPTOSS_OP
}
#undef GPTOSS_TILE_CASES

// out[row][n] = bias[n] + sum_k W[n][k] x[row][k] for output rows [n0, n1) and the pass's rows (T tiles).
template <int T>
void amx_pass(const uint8_t* blocks, const uint8_t* scales, const void* bias, int64_t bias_dtype, int64_t n0,
              int64_t n1, int64_t G, const uint16_t* packed, int rows, float* const* out) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) uint16_t a[16 * 32];
  alignas(64) float c[T][16 * 16];
  for (int64_t o0 = n0; o0 < n1; o0 += 16) {
    const int valid = static_cast<int>(std::min<int64_t>(16, n1 - o0));
    if (valid < 16) std::memset(a, 0, sizeof a);  // output rows past N multiply as zero
    [&]<int... J>(std::integer_sequence<int, J...>) { (amx_zero<J>(), ...); }(std::make_integer_sequence<int, T>{});
    for (int64_t g = 0; g < G; ++g) {
      for (int i = 0; i < valid; ++i) {
        const int64_t b = (o0 + i) * G + g;
        // 16 weight rows are 16 streams, more than the hardware prefetcher follows: 2 lines ahead by hand
        // (2 threads, 32 experts x 8 rows of a 20b mlp1: 46 -> 27 ms; 4 lines ahead 32 ms).
        if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(blocks + (b + 8) * kBytes), _MM_HINT_T0);
        __m256i even, odd;
        decode_bf16_words(blocks + b * kBytes, scales[b], even, odd);
        _mm256_store_si256(reinterpret_cast<__m256i*>(a + i * 32), even);
        _mm256_store_si256(reinterpret_cast<__m256i*>(a + i * 32 + 16), odd);
      }
      _tile_loadd(6, a, 64);
      [&]<int... J>(std::integer_sequence<int, J...>) {
        (amx_step<J>(packed + (J * G + g) * 512), ...);
      }(std::make_integer_sequence<int, T>{});
    }
    [&]<int... J>(std::integer_sequence<int, J...>) { (amx_store<J>(c[J]), ...); }(std::make_integer_sequence<int, T>{});
    for (int j = 0; j < T; ++j)
      for (int col = 0; col < kAmxTokens && j * kAmxTokens + col < rows; ++col)
        for (int i = 0; i < valid; ++i)
          out[j * kAmxTokens + col][o0 + i] = c[j][i * 16 + col] + (bias ? load_float(bias, bias_dtype, o0 + i) : 0.f);
  }
  _tile_release();
}

using AmxPassFn = void (*)(const uint8_t*, const uint8_t*, const void*, int64_t, int64_t, int64_t, int64_t,
                           const uint16_t*, int, float* const*);
constexpr AmxPassFn kAmxPassFns[] = {amx_pass<1>, amx_pass<2>, amx_pass<3>, amx_pass<4>, amx_pass<5>, amx_pass<6>};
static_assert(sizeof(kAmxPassFns) / sizeof(kAmxPassFns[0]) == kAmxMaxTiles);

// The experts of by_expert with at least GPTOSS_AMX_MIN_ROWS rows, on the tiles; their rows are then removed
// from by_expert, which linear() finishes on the vector units.
void linear_amx(const uint16_t* x, int64_t K, const uint8_t* blocks, const uint8_t* scales, int64_t N,
                const void* bias, int64_t bias_dtype, std::vector<std::vector<int64_t>>& by_expert, float* out) {
  const int64_t G = K / kBlock, rows_max = kAmxTokens * kAmxMaxTiles;
  struct Pass {
    int64_t expert;
    int rows;
    size_t packed;  // offset in packed
    const uint16_t* x[kAmxTokens * kAmxMaxTiles];
    float* out[kAmxTokens * kAmxMaxTiles];
  };
  std::vector<Pass> passes;
  size_t words = 0;
  for (size_t e = 0; e < by_expert.size(); ++e) {
    if (static_cast<int64_t>(by_expert[e].size()) < GPTOSS_AMX_MIN_ROWS) continue;
    for (size_t i = 0; i < by_expert[e].size(); i += rows_max) {
      Pass p{static_cast<int64_t>(e), static_cast<int>(std::min<size_t>(rows_max, by_expert[e].size() - i)), words,
             {}, {}};
      for (int r = 0; r < p.rows; ++r) {
        const int64_t m = by_expert[e][i + r];
        p.x[r] = x + m * K;
        p.out[r] = out + m * N;
      }
      words += static_cast<size_t>((p.rows + kAmxTokens - 1) / kAmxTokens) * G * 512;
      passes.push_back(p);
    }
    by_expert[e].clear();
  }
  if (passes.empty()) return;
  std::vector<uint16_t> packed(words);
  for (const Pass& p : passes) pack_amx(p.x, p.rows, G, packed.data() + p.packed);
  const int64_t tasks_per_pass = (N + kAmxRowsPerTask - 1) / kAmxRowsPerTask;
  parallel_tasks(static_cast<int64_t>(passes.size()) * tasks_per_pass, false, [&](int64_t i) {
    const Pass& p = passes[i / tasks_per_pass];
    const int64_t n0 = (i % tasks_per_pass) * kAmxRowsPerTask, n1 = std::min(N, n0 + kAmxRowsPerTask);
    const void* b = expert_bias(bias, bias_dtype, p.expert, N);
    kAmxPassFns[(p.rows + kAmxTokens - 1) / kAmxTokens - 1](blocks + p.expert * N * G * kBytes, scales + p.expert * N * G,
                                                            b, bias_dtype, n0, n1, G, packed.data() + p.packed, p.rows, p.out);
  });
}
#endif

// out[m] = x[m] @ W[ids[m]].T + bias[ids[m]] (fp32). x, bias: fp32 or bf16 (bias may be null).
void linear(const void* x, int64_t x_dtype, int64_t M, int64_t K, const uint8_t* blocks, const uint8_t* scales,
            int64_t E, int64_t N, const void* bias, int64_t bias_dtype, const int64_t* ids, float* out) {
  const int64_t G = K / kBlock;
  std::vector<std::vector<int64_t>> by_expert(E);
  for (int64_t m = 0; m < M; ++m) by_expert[ids[m]].push_back(m);
#ifdef GPTOSS_AMX
  // Experts with several bf16 rows go to the tiles and leave by_expert; the vector kernels take the rest.
  if (x_dtype == kBF16 && amx_ready()) linear_amx(static_cast<const uint16_t*>(x), K, blocks, scales, N, bias,
                                                  bias_dtype, by_expert, out);
#endif
  int64_t left = 0;
  for (const auto& rows : by_expert) left += static_cast<int64_t>(rows.size());
  // The rows left, in decode order, once per call (left·K values: small next to the weights), row after row in
  // the order the passes take them: bf16 words where the CPU multiplies bf16 natively, fp32 otherwise.
  const bool bf16 = x_dtype == kBF16 && use_vdpbf16ps();
  std::vector<float> xs(bf16 ? 0 : static_cast<size_t>(left * K));
  std::vector<uint16_t> xs16(bf16 ? static_cast<size_t>(left * K) : 0);
  int order[kBlock];
  for (int p = 0; p < kBlock; ++p) order[p] = bf16 ? activation_element_bf16(p) : activation_element(p);
  auto permute = [&](int64_t m, int64_t slot) {  // row m of x into row slot of xs / xs16
    for (int64_t g = 0; g < G; ++g) {  // one 32-value block at a time
      const int64_t i = m * G + g, o = (slot * G + g) * kBlock;
      if (bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(x) + i * kBlock;
        for (int p = 0; p < kBlock; ++p) xs16[o + p] = src[order[p]];
      } else if (x_dtype == kBF16) {
        const uint16_t* src = static_cast<const uint16_t*>(x) + i * kBlock;
        for (int p = 0; p < kBlock; ++p) xs[o + p] = bf16_to_float(src[order[p]]);
      } else {
        const float* src = static_cast<const float*>(x) + i * kBlock;
        for (int p = 0; p < kBlock; ++p) xs[o + p] = src[order[p]];
      }
    }
  };
  const PassFn* pass_fns = bf16 ? kPassFns<uint16_t> : kPassFns<float>;
  // Rows grouped by expert in chunks of at most kMaxRows: each chunk is one pass over that expert.
  struct Pass {
    int64_t expert;
    int rows;
    const void* x[kMaxRows];
    float* out[kMaxRows];
    const void* bias;  // bias[expert] (bias_dtype), null if none
  };
  std::vector<Pass> passes;
  int64_t slot = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (size_t i = 0; i < by_expert[e].size(); i += kMaxRows) {
      Pass p{e, static_cast<int>(std::min<size_t>(kMaxRows, by_expert[e].size() - i)), {}, {}, {}};
      for (int r = 0; r < p.rows; ++r, ++slot) {
        const int64_t m = by_expert[e][i + r];
        permute(m, slot);
        p.x[r] = bf16 ? static_cast<const void*>(xs16.data() + slot * K) : xs.data() + slot * K;
        p.out[r] = out + m * N;
      }
      p.bias = expert_bias(bias, bias_dtype, e, N);
      passes.push_back(p);
    }
  }
  // One flat set of tasks (pass, slice of kRowsPerTask output rows), each streaming contiguous weight rows.
  // Tiny problems (< 64 KiB of weights) stay on the calling thread.
  const int64_t tasks_per_pass = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = static_cast<int64_t>(passes.size()) * tasks_per_pass;
  parallel_tasks(tasks, static_cast<int64_t>(passes.size()) * N * G * (kBytes + 1) < (int64_t{1} << 16), [&](int64_t i) {
    const Pass& p = passes[i / tasks_per_pass];
    const int64_t n0 = (i % tasks_per_pass) * kRowsPerTask, n1 = std::min(N, n0 + kRowsPerTask);
    pass_fns[p.rows - 1](blocks + p.expert * N * G * kBytes, scales + p.expert * N * G, p.bias, bias_dtype, n0, n1,
                         G, p.x, p.out);
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
          o[0] = float_to_bf16_rne(v0);  // exact: every dequantized value is a bf16 value
          o[1] = float_to_bf16_rne(v1);
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
               int64_t n1, int64_t N, void* out, int64_t out_dtype) {
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
    for (int r = 0; r < R; ++r) store_float(out, out_dtype, r * N + n, sums[r] + b);
  }
}

#ifdef GPTOSS_AVX512
// fp32 activations on AVX-512: 32 weights per 64-byte load; the low words shifted up and the high words masked
// are their fp32 values, matched by activations pre-permuted per 32 (the even elements, then the odd ones; the
// K % 32 tail in order). Loads are prefetched (kStreamAhead) where that pays (not on AMD, see use_vdpbf16ps;
// the Xeon, 2 threads: 21 -> 26 GB/s from DRAM).
template <int R>
void bf16_rows_512(const float* x, int64_t K, const uint16_t* w, const void* bias, int64_t bias_dtype, int64_t n0,
                   int64_t n1, int64_t N, void* out, int64_t out_dtype) {
  constexpr int A = R <= 2 ? 2 : 1;  // 32-weight steps per iteration: at least four FMA chains
  const int64_t ahead = cpu_is_amd() ? 0 : kStreamAhead;
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t K32 = K - K % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    __m512 acc[R][2 * A];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 2 * A; ++a) acc[r][a] = _mm512_setzero_ps();
    auto step = [&](int64_t k, int a) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(wn + k) + ahead, kStreamHint);
      const __m512i v = _mm512_loadu_si512(wn + k);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), odd = _mm512_castsi512_ps(_mm512_and_si512(v, top));
      for (int r = 0; r < R; ++r) {
        acc[r][a] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + r * K + k), acc[r][a]);
        acc[r][a + 1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + r * K + k + 16), acc[r][a + 1]);
      }
    };
    int64_t k = 0;
    for (; k + 32 * A <= K32; k += 32 * A)
      for (int a = 0; a < A; ++a) step(k + 32 * a, 2 * a);
    for (; k < K32; k += 32) step(k, 0);
    float sums[R];
    for (int r = 0; r < R; ++r) {
      __m512 s = acc[r][0];
      for (int a = 1; a < 2 * A; ++a) s = _mm512_add_ps(s, acc[r][a]);
      sums[r] = _mm512_reduce_add_ps(s);
    }
    for (; k < K; ++k) {
      const float wk = bf16_to_float(wn[k]);
      for (int r = 0; r < R; ++r) sums[r] += wk * x[r * K + k];
    }
    const float b = bias ? load_float(bias, bias_dtype, n) : 0.f;
    for (int r = 0; r < R; ++r) store_float(out, out_dtype, r * N + n, sums[r] + b);
  }
}
#endif

#ifdef GPTOSS_AVX512BF16
// bf16 activations on AVX-512 BF16: 32 weights and 32 activations per vdpbf16ps, no conversion; the tail of
// a row is a masked load (zeros beyond K).
template <int R>
void bf16_rows_dp(const uint16_t* x, int64_t K, const uint16_t* w, const void* bias, int64_t bias_dtype,
                  int64_t n0, int64_t n1, int64_t N, void* out, int64_t out_dtype) {
  constexpr int A = R <= 2 ? 2 : 1;  // chains per row: cover vdpbf16ps's latency with few rows
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = w + n * K;
    __m512 acc[R][A];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * A <= K; k += 32 * A)
      for (int a = 0; a < A; ++a) {
        const __m512i wv = _mm512_loadu_si512(wn + k + 32 * a);
        for (int r = 0; r < R; ++r)
          acc[r][a] = _mm512_dpbf16_ps(acc[r][a], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32 * a));
      }
    for (; k < K; k += 32) {
      const __mmask32 m = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
      const __m512i wv = _mm512_maskz_loadu_epi16(m, wn + k);
      for (int r = 0; r < R; ++r)
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)wv, (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * K + k));
    }
    const float b = bias ? load_float(bias, bias_dtype, n) : 0.f;
    for (int r = 0; r < R; ++r) {
      __m512 a = acc[r][0];
      for (int i = 1; i < A; ++i) a = _mm512_add_ps(a, acc[r][i]);
      store_float(out, out_dtype, r * N + n, _mm512_reduce_add_ps(a) + b);
    }
  }
}
#endif

constexpr int kBf16MaxRows = 4;
using Bf16Fn = void (*)(const float*, int64_t, const uint16_t*, const void*, int64_t, int64_t, int64_t, int64_t,
                        void*, int64_t);
#ifdef GPTOSS_AVX512
constexpr Bf16Fn kBf16Fns[kBf16MaxRows] = {bf16_rows_512<1>, bf16_rows_512<2>, bf16_rows_512<3>, bf16_rows_512<4>};
#else
constexpr Bf16Fn kBf16Fns[kBf16MaxRows] = {bf16_rows<1>, bf16_rows<2>, bf16_rows<3>, bf16_rows<4>};
#endif
#ifdef GPTOSS_AVX512BF16
using Bf16DpFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const void*, int64_t, int64_t, int64_t,
                          int64_t, void*, int64_t);
constexpr Bf16DpFn kBf16DpFns[kBf16MaxRows] = {bf16_rows_dp<1>, bf16_rows_dp<2>, bf16_rows_dp<3>, bf16_rows_dp<4>};
#endif

// x: fp32 or bf16 (x_dtype) [M, K]; out [M, N] fp32 or bf16 (out_dtype, rounded to nearest even).
// The few-row dense kernels' work split: output rows in tasks of 64, activation rows in passes of at most
// kBf16MaxRows; pass(m, r, n0, n1) runs activation rows [m, m + r) over output rows [n0, n1).
template <typename F>
void row_passes(int64_t M, int64_t N, bool serial, const F& pass) {
  const int64_t rows_per_task = 64;
  parallel_tasks((N + rows_per_task - 1) / rows_per_task, serial, [&](int64_t task) {
    const int64_t n0 = task * rows_per_task, n1 = std::min(N, n0 + rows_per_task);
    for (int64_t m = 0; m < M; m += kBf16MaxRows) pass(m, std::min<int64_t>(kBf16MaxRows, M - m), n0, n1);
  });
}

void bf16_linear(const void* x, int64_t x_dtype, int64_t M, int64_t K, const uint16_t* w, int64_t N,
                 const void* bias, int64_t bias_dtype, void* out, int64_t out_dtype) {
  const size_t out_elem = out_dtype == kBF16 ? 2 : 4;
  const bool dp = x_dtype == kBF16 && use_vdpbf16ps();
#ifdef GPTOSS_AVX512
  const bool permute = true;  // bf16_rows_512's activation order: even elements, then odd, per 32
#else
  const bool permute = false;
#endif
  std::vector<float> x32;  // fp32 once per call where vdpbf16ps is not used
  if (!dp && (x_dtype == kBF16 || permute)) {
    x32.resize(static_cast<size_t>(M * K));
    const int64_t K32 = K - K % 32;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = !permute || k >= K32 ? k : k - k % 32 + activation_element_bf16(static_cast<int>(k % 32));
        x32[m * K + k] = load_float(x, x_dtype, m * K + src);
      }
  }
  const float* xf = x32.empty() ? static_cast<const float*>(x) : x32.data();
  row_passes(M, N, N * K * 2 < (int64_t{1} << 16), [&](int64_t m, int64_t r, int64_t n0, int64_t n1) {
#ifdef GPTOSS_AVX512BF16
    if (dp) {
      kBf16DpFns[r - 1](static_cast<const uint16_t*>(x) + m * K, K, w, bias, bias_dtype, n0, n1, N,
                        static_cast<uint8_t*>(out) + m * N * out_elem, out_dtype);
      return;
    }
#endif
    kBf16Fns[r - 1](xf + m * K, K, w, bias, bias_dtype, n0, n1, N, static_cast<uint8_t*>(out) + m * N * out_elem,
                    out_dtype);
  });
}

// ---------------------------------------------------------------- int8 weights, few rows (the opt-in unembedding)
// out[m][n] = scale[n] · Σ_k q[n][k] · x[m][k] (fp32) for int8 q [N, K] with one fp32 scale per row: half the
// bytes of bf16, so half the unembedding's share of a decode step. x: M ≤ 4 fp32 rows.
template <int R, typename Epilogue>
void int8_rows(const float* x, int64_t K, const int8_t* w, int64_t n0, int64_t n1, const Epilogue& epilogue) {
#if defined(GPTOSS_AVX512)
  const bool prefetch = !cpu_is_amd();  // see bf16_rows_512
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    float sums[R];
    int64_t k = 0;
#if defined(GPTOSS_AVX512)
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wn + k) + kStreamAhead, kStreamHint);
      for (int h = 0; h < 2; ++h) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + k + 16 * h))));
        for (int r = 0; r < R; ++r) acc[r][h] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k + 16 * h), acc[r][h]);
      }
    }
    for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
#elif defined(GPTOSS_AVX2)
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16)
      for (int h = 0; h < 2; ++h) {
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wn + k + 8 * h))));
        for (int r = 0; r < R; ++r) acc[r][h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k + 8 * h), acc[r][h]);
      }
    for (int r = 0; r < R; ++r) sums[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int r = 0; r < R; ++r) sums[r] = 0.f;
#endif
    for (; k < K; ++k)
      for (int r = 0; r < R; ++r) sums[r] += static_cast<float>(wn[k]) * x[r * K + k];
    for (int r = 0; r < R; ++r) epilogue(r, n, sums[r]);  // Σ_k q[n][k]·x[r][k], before the row's scale
  }
}

// int8_rows for r ≤ kBf16MaxRows activation rows at x.
template <typename Epilogue>
void int8_rows_dispatch(int64_t r, const float* x, int64_t K, const int8_t* w, int64_t n0, int64_t n1,
                        const Epilogue& epilogue) {
  switch (r) {
    case 1: int8_rows<1>(x, K, w, n0, n1, epilogue); break;
    case 2: int8_rows<2>(x, K, w, n0, n1, epilogue); break;
    case 3: int8_rows<3>(x, K, w, n0, n1, epilogue); break;
    default: int8_rows<4>(x, K, w, n0, n1, epilogue); break;
  }
}

// x [M, K] fp32 or bf16 (x_dtype), M ≤ kBf16MaxRows per pass; out [M, N] fp32.
void int8_linear(const void* x, int64_t x_dtype, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
                 float* out) {
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_float(x, x_dtype, i);
  row_passes(M, N, N * K < (int64_t{1} << 16), [&](int64_t m, int64_t r, int64_t n0, int64_t n1) {
    float* o = out + m * N;
    int8_rows_dispatch(r, xf.data() + m * K, K, w, n0, n1, [&](int r_, int64_t n, float sum) {
      o[r_ * N + n] = sum * scale[n];
    });
  });
}

// model.BoundedArgmax in one pass over the int8 rows: for each activation row m and vocabulary row n the proxy
// p = scale[n]·Σ q·x, the bound b = h_norm[m]·row_bound[n], widened by (|p| + b)·2⁻⁷ + 10⁻³⁰, then
// lo = p − b and hi = p + b, over temperature[m] plus noise[m][n] where temperature is given (> 0 rows).
// hi [M, N] is written, each row's max lo to max_lo [M]; returns false if any lo or hi is not finite.
bool int8_bounds(const void* x, int64_t x_dtype, int64_t M, int64_t K, const int8_t* w, const float* scale,
                 const float* row_bound, int64_t N, const float* h_norm, const float* temperature,
                 const float* noise, float* hi, float* max_lo) {
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_float(x, x_dtype, i);
  const int64_t rows_per_task = 64, tasks = (N + rows_per_task - 1) / rows_per_task;
  std::vector<float> task_max(static_cast<size_t>(tasks * M), -std::numeric_limits<float>::infinity());
  std::atomic<bool> finite{true};
  parallel_tasks(tasks, N * K < (int64_t{1} << 16), [&](int64_t task) {
    const int64_t n0 = task * rows_per_task, n1 = std::min(N, n0 + rows_per_task);
    bool ok = true;
    for (int64_t m = 0; m < M; m += kBf16MaxRows) {
      int8_rows_dispatch(std::min<int64_t>(kBf16MaxRows, M - m), xf.data() + m * K, K, w, n0, n1,
                         [&](int r, int64_t n, float sum) {
        const int64_t row = m + r;
        const float p = sum * scale[n];
        float b = h_norm[row] * row_bound[n];
        b = b + (std::fabs(p) + b) * 0.0078125f + 1e-30f;
        float lo = p - b, h = p + b;
        if (temperature && temperature[row] > 0) {
          lo = lo / temperature[row] + noise[row * N + n];
          h = h / temperature[row] + noise[row * N + n];
        }
        ok = ok && std::isfinite(lo) && std::isfinite(h);
        hi[row * N + n] = h;
        float& best = task_max[task * M + row];
        best = std::max(best, lo);
      });
    }
    if (!ok) finite = false;
  });
  for (int64_t m = 0; m < M; ++m) {
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < tasks; ++t) best = std::max(best, task_max[t * M + m]);
    max_lo[m] = best;
  }
  return finite;
}

// The rows of a bf16 weight [N, K] quantized as int8_linear reads them (symmetric, scale = max|row| / 127,
// floored at the smallest normal float, rounded half to even as torch.round), with
// each row's ‖w‖₂ and ‖w − q·scale‖₂ (model.BoundedArgmax's bound). One pass over the weight, rows in parallel.
void quantize_rows_int8(const uint16_t* w, int64_t N, int64_t K, int8_t* q, float* scale, float* err, float* norm) {
  parallel_tasks((N + 63) / 64, N * K < (int64_t{1} << 16), [&](int64_t task) {
    std::vector<float> row(K);
    for (int64_t n = task * 64; n < std::min(N, task * 64 + 64); ++n) {
      float amax = 0.f;
      double ss = 0;
      for (int64_t k = 0; k < K; ++k) {
        row[k] = bf16_to_float(w[n * K + k]);
        amax = std::max(amax, std::fabs(row[k]));
        ss += static_cast<double>(row[k]) * row[k];
      }
      const float sc = std::max(amax / 127.f, std::numeric_limits<float>::min());
      double es = 0;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / sc)));  // half to even
        q[n * K + k] = static_cast<int8_t>(v);
        const double d = static_cast<double>(row[k]) - static_cast<double>(v) * sc;
        es += d * d;
      }
      scale[n] = sc;
      err[n] = static_cast<float>(std::sqrt(es));
      norm[n] = static_cast<float>(std::sqrt(ss));
    }
  });
}

// ---------------------------------------------------------------- the small steps of a decode step
// One call each instead of a dozen torch ops: at batch 1 a token spends more time dispatching tiny ops than
// computing them. Each equals the model's torch code (model.py) in fp32 up to summation order and the
// last bit of exp(); results are rounded to the activation dtype where the torch code rounds.

// out[m] = x[m] · rsqrt(mean(x[m]²) + eps) · scale, fp32 math, stored in x's dtype (RMSNorm.forward).
void rmsnorm(const void* x, int64_t dtype, int64_t M, int64_t D, const float* scale, float eps, void* out) {
  std::vector<float> row(D);
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0;  // fp64 sum: one ulp of fp32 mean at most, whatever D
    for (int64_t d = 0; d < D; ++d) {
      row[d] = load_float(x, dtype, m * D + d);
      ss += static_cast<double>(row[d]) * row[d];
    }
    const float r = 1.0f / std::sqrt(static_cast<float>(ss / D) + eps);
    for (int64_t d = 0; d < D; ++d) store_float(out, dtype, m * D + d, (row[d] * r) * scale[d]);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef GPTOSS_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w·x
  int64_t i = 0;
#ifdef GPTOSS_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

#ifdef GPTOSS_AVX2
// e^x for x ≤ 0 (scores minus their maximum): 2^n · e^r with r = x − n·ln 2 in [−ln 2/2, ln 2/2] and a
// degree-6 Taylor polynomial, ≈ 2 ulp; below −87 (e^x < 2^-126) it returns about 2^-126 instead of ~0.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 poly = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(e));
}

// [Σ a[0], ..., Σ a[7]] of eight vectors.
inline __m256 hsum8(const __m256* a) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 w = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u, w, 0x20), _mm256_permute2f128_ps(u, w, 0x31));
}

// Attention of the 8 query heads that share one kv head (GPT-oss: 64 / 8), vectorised across the heads:
// scores key-major [n][8], one max / exp / sum per head in the lanes of a vector. q [8][Dh], keys/values
// at k + key·stride, Dh a multiple of 8; out [8][Dh] fp32.
void attend_8_heads(const float* q, const float* k, const float* v, const int64_t* keys, int64_t n, int64_t stride,
                    int64_t Dh, float inv_sqrt, const float* sinks, float* scores, float* out) {
  __m256 mx = sinks ? _mm256_loadu_ps(sinks) : _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  // The keys of one kv head lie a cache row apart (2 KiB at 8 kv heads): the loads miss, and without a
  // prefetch this loop waited on them (half its samples, perf, context 4096).
  constexpr int64_t kAhead = 16;  // keys
  const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(float));
  auto prefetch_row = [&](const float* base, int64_t j) {
    const char* p = reinterpret_cast<const char*>(base + keys[j] * stride);
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  };
  for (int64_t j = 0; j < n; ++j) {
    if (j + kAhead < n) prefetch_row(k, j + kAhead);
    const float* kj = k + keys[j] * stride;
    __m256 acc[8];
    for (int g = 0; g < 8; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < Dh; d += 8) {
      const __m256 kd = _mm256_loadu_ps(kj + d);
      for (int g = 0; g < 8; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * Dh + d), kd, acc[g]);
    }
    const __m256 sc = _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(inv_sqrt));
    _mm256_storeu_ps(scores + 8 * j, sc);
    mx = _mm256_max_ps(mx, sc);
  }
  alignas(32) float m[8], sum[8];
  _mm256_store_ps(m, mx);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + 8 * j), mx));
    _mm256_storeu_ps(scores + 8 * j, e);
    total = _mm256_add_ps(total, e);
  }
  _mm256_store_ps(sum, total);
  // Weighted sum of the values, 64 keys at a time (16 KiB of values at Dh = 64: they stay in L1 while the
  // 8 heads pass over them; a pass over all keys per head would read every value 8 times from DRAM)
  std::fill(out, out + 8 * Dh, 0.f);
  for (int64_t j = 0; j < std::min<int64_t>(n, 64); ++j) prefetch_row(v, j);
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t j1 = std::min<int64_t>(n, j0 + 64);
    for (int g = 0; g < 8; ++g)
      for (int64_t d0 = 0; d0 < Dh; d0 += 64) {  // 8 accumulators of 8 values at a time
        float* o = out + g * Dh + d0;
        // w == 8 (Dh = 64, GPT-oss) with a constant count, so the accumulators stay in registers
        auto pass = [&](auto width) {
          constexpr int w = decltype(width)::value;
          __m256 acc[8];
          for (int c = 0; c < w; ++c) acc[c] = _mm256_loadu_ps(o + 8 * c);
          for (int64_t j = j0; j < j1; ++j) {
            if (g == 0 && d0 == 0 && j + 64 < n) prefetch_row(v, j + 64);  // the next 64 keys' values
            const __m256 p = _mm256_set1_ps(scores[8 * j + g]);
            const float* vj = v + keys[j] * stride + d0;
            for (int c = 0; c < w; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * c), acc[c]);
          }
          for (int c = 0; c < w; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
        };
        switch (std::min<int64_t>(64, Dh - d0) / 8) {
          case 8: pass(std::integral_constant<int, 8>{}); break;
          case 7: pass(std::integral_constant<int, 7>{}); break;
          case 6: pass(std::integral_constant<int, 6>{}); break;
          case 5: pass(std::integral_constant<int, 5>{}); break;
          case 4: pass(std::integral_constant<int, 4>{}); break;
          case 3: pass(std::integral_constant<int, 3>{}); break;
          case 2: pass(std::integral_constant<int, 2>{}); break;
          default: pass(std::integral_constant<int, 1>{}); break;
        }
      }
  }
  for (int g = 0; g < 8; ++g) {
    if (sinks) sum[g] += std::exp(sinks[g] - m[g]);
    const float inv = 1.0f / sum[g];  // no keys and no sink: 1/0 · 0 = NaN, as torch's softmax of all −inf
    for (int64_t d = 0; d < Dh; ++d) out[g * Dh + d] *= inv;
  }
}
#endif

// One query position per row (decode) through RoPE, the KV cache and attention with sinks (Attention.forward
// with apply_rope, LayerCache.update and sdpa_with_sinks). qkv [B, (H + 2K)·Dh] in `dtype`, as the qkv
// projection rounded it; cos/sin [B, Dh/2]; the cache k/v [B, S, K, Dh] fp32 and pos [B, S] int64, row b's
// new key written at slot slots[b] with position q_pos[b] (rows of one age share a slot; the engine's rows,
// each of its own age, do not); keys with 0 ≤ p ≤ q_pos and (window > 0) p > q_pos −
// window are attended; sinks [H] fp32 or null; out [B, H·Dh] in `dtype`.
void decode_attention(const void* qkv, int64_t dtype, int64_t B, int64_t H, int64_t K, int64_t Dh,
                      const float* cos, const float* sin, float* cache_k, float* cache_v, int64_t* cache_pos,
                      int64_t S, const int64_t* slots, const int64_t* q_pos, int64_t window, const float* sinks,
                      void* out) {
  const int64_t G = H / K, half = Dh / 2, width = (H + 2 * K) * Dh;
  std::vector<float> q(static_cast<size_t>(B * H * Dh));
  auto rope = [&](int64_t b, const int64_t src, float* dst) {  // rotate one head; round as apply_rope does
    const float* c = cos + b * half;
    const float* sn = sin + b * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = load_float(qkv, dtype, b * width + src + i), x2 = load_float(qkv, dtype, b * width + src + half + i);
      dst[i] = round_to(x1 * c[i] - x2 * sn[i], dtype);
      dst[half + i] = round_to(x2 * c[i] + x1 * sn[i], dtype);
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) rope(b, h * Dh, q.data() + (b * H + h) * Dh);
    for (int64_t kh = 0; kh < K; ++kh) {
      float* kd = cache_k + ((b * S + slots[b]) * K + kh) * Dh;
      rope(b, (H + kh) * Dh, kd);
      float* vd = cache_v + ((b * S + slots[b]) * K + kh) * Dh;
      for (int64_t i = 0; i < Dh; ++i) vd[i] = load_float(qkv, dtype, b * width + (H + K + kh) * Dh + i);
    }
    cache_pos[b * S + slots[b]] = q_pos[b];
  }
  // The slots each row attends to (the same for all its kv heads)
  std::vector<std::vector<int64_t>> row_keys(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t p = cache_pos[b * S + s];
      if (p >= 0 && p <= q_pos[b] && (window <= 0 || p > q_pos[b] - window)) row_keys[b].push_back(s);
    }
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(Dh));
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(static_cast<size_t>(G * Dh));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / K, kh = i % K;
      const std::vector<int64_t>& keys = row_keys[b];
      const int64_t n = static_cast<int64_t>(keys.size());
      if (scores.size() < static_cast<size_t>(G * n)) scores.resize(G * n);  // [G][n], or [n][8] below
#ifdef GPTOSS_AVX2
      if (G == 8 && Dh % 8 == 0) {
        attend_8_heads(q.data() + (b * H + kh * G) * Dh, cache_k + b * S * K * Dh + kh * Dh,
                       cache_v + b * S * K * Dh + kh * Dh, keys.data(), n, K * Dh, Dh, inv_sqrt,
                       sinks ? sinks + kh * G : nullptr, scores.data(), acc.data());
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < Dh; ++d) store_float(out, dtype, (b * H + kh * G + g) * Dh + d, acc[g * Dh + d]);
        continue;
      }
#endif
      for (int64_t j = 0; j < n; ++j) {
        const float* kv = cache_k + ((b * S + keys[j]) * K + kh) * Dh;
        for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot(q.data() + (b * H + kh * G + g) * Dh, kv, Dh) * inv_sqrt;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> denom(G);
      for (int64_t g = 0; g < G; ++g) {
        float* sc = scores.data() + g * n;
        const float sink = sinks ? sinks[kh * G + g] : -std::numeric_limits<float>::infinity();
        float mx = sink;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
        float sum = sinks ? std::exp(sink - mx) : 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
        denom[g] = sum;
      }
      for (int64_t j = 0; j < n; ++j) {
        const float* vv = cache_v + ((b * S + keys[j]) * K + kh) * Dh;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + j] / denom[g], vv, acc.data() + g * Dh, Dh);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < Dh; ++d)
          store_float(out, dtype, (b * H + kh * G + g) * Dh + d, n || sinks ? acc[g * Dh + d] : std::nanf(""));
    }
  });
}

#ifdef GPTOSS_AVX2
// Eight interleaved (gate, linear) pairs from h[2j..2j+16) as two vectors of eight; the lanes come out in the
// order 0 1 4 5 2 3 6 7 (in-lane shuffles), which store8_pairs_order puts back.
inline void load8_pairs(const void* h, int64_t dtype, int64_t j, __m256& gate, __m256& lin) {
  __m256 a, b;
  if (dtype == kBF16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(h) + 2 * j));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
    b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
  } else {
    a = _mm256_loadu_ps(static_cast<const float*>(h) + 2 * j);
    b = _mm256_loadu_ps(static_cast<const float*>(h) + 2 * j + 8);
  }
  gate = _mm256_shuffle_ps(a, b, 0x88);
  lin = _mm256_shuffle_ps(a, b, 0xDD);
}

// Stores y (lanes in load8_pairs' order) to out[j..j+8) in dtype; bf16 rounded as float_to_bf16_rne.
inline void store8_pairs_order(void* out, int64_t dtype, int64_t j, __m256 y) {
  y = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(y), 0xD8));
  if (dtype != kBF16) {
    _mm256_storeu_ps(static_cast<float*>(out) + j, y);
    return;
  }
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + j), _mm256_castsi256_si128(packed));
}
#endif

// Clamped SwiGLU of GPT-oss (model.swiglu) on n interleaved (gate, linear) pairs of h, fp32 math, one
// rounding to out_dtype. σ(αg) from e = e^(−|αg|) ≤ 1 (the attention's vector exp, ≈ 2 ulp; 0 below e^-87):
// 1 / (1 + e) for αg ≥ 0, e / (1 + e) below. A NaN stays NaN (the clamps take the constant first).
void swiglu(const void* h, int64_t h_dtype, int64_t n, float alpha, float limit, void* out, int64_t out_dtype) {
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
#ifdef GPTOSS_AVX2
    const __m256 hi = _mm256_set1_ps(limit), lo = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.f);
    for (; j + 8 <= end; j += 8) {
      __m256 gate, lin;
      load8_pairs(h, h_dtype, j, gate, lin);
      gate = _mm256_min_ps(hi, gate);
      lin = _mm256_min_ps(hi, _mm256_max_ps(lo, lin));
      const __m256 z = _mm256_mul_ps(_mm256_set1_ps(alpha), gate);
      const __m256 nz = _mm256_or_ps(z, _mm256_set1_ps(-0.0f));  // −|z|
      // e^(−|z|), and 0 where it is below fp32's normal range (exp_nonpositive would return ≈ 2^-126)
      const __m256 e = _mm256_and_ps(exp_nonpositive(nz), _mm256_cmp_ps(nz, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
      const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
      const __m256 sigmoid = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), z);  // z's sign bit picks e / (1 + e)
      store8_pairs_order(out, out_dtype, j, _mm256_mul_ps(_mm256_mul_ps(gate, sigmoid), _mm256_add_ps(lin, one)));
    }
#endif
    for (; j < end; ++j) {
      const float gate = std::min(load_float(h, h_dtype, 2 * j), limit);
      const float lin = std::min(std::max(load_float(h, h_dtype, 2 * j + 1), -limit), limit);
      store_float(out, out_dtype, j, gate * (1.0f / (1.0f + std::exp(-alpha * gate))) * (lin + 1.0f));
    }
  });
}

// The MoE's experts for a few tokens (MoE._fused): t [N, D] in `dtype` (normed), experts/weights [N, k]
// (int64 / fp32 routing), mlp1 [E, 2I, D/32, 16] + bias [E, 2I], clamped SwiGLU on interleaved (gate,
// linear) columns rounded to `dtype`, mlp2 [E, D, I/32, 16] + bias [E, D]; out [N, D] fp32 = Σ_j w_j · y_j.
// With `residual` [N, D] (in `dtype`): out [N, D] in `dtype` = residual + (Σ_j w_j · y_j rounded to dtype), the
// MoE block's output (MoE.forward).
void moe_experts(const void* t, int64_t dtype, int64_t N, int64_t D, const int64_t* experts, const float* weights,
                 int64_t k, int64_t E, int64_t I, const uint8_t* blocks1, const uint8_t* scales1, const void* bias1,
                 const uint8_t* blocks2, const uint8_t* scales2, const void* bias2, int64_t bias_dtype,
                 float alpha, float limit, const void* residual, void* out) {
  const int64_t rows = N * k;
  const size_t elem = dtype == kBF16 ? 2 : 4;
  std::vector<uint8_t> x(rows * D * elem);  // each token once per chosen expert
  for (int64_t r = 0; r < rows; ++r) std::memcpy(x.data() + r * D * elem, static_cast<const uint8_t*>(t) + (r / k) * D * elem, D * elem);
  std::vector<float> h(static_cast<size_t>(rows * 2 * I));
  linear(x.data(), dtype, rows, D, blocks1, scales1, E, 2 * I, bias1, bias_dtype, experts, h.data());
  std::vector<uint8_t> act(rows * I * elem);
  swiglu(h.data(), kF32, rows * I, alpha, limit, act.data(), dtype);
  std::vector<float> y(static_cast<size_t>(rows * D));
  linear(act.data(), dtype, rows, I, blocks2, scales2, E, D, bias2, bias_dtype, experts, y.data());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += y[(n * k + j) * D + d] * weights[n * k + j];
      if (residual) store_float(out, dtype, n * D + d, load_float(residual, dtype, n * D + d) + round_to(s, dtype));
      else static_cast<float*>(out)[n * D + d] = s;
    }
}

// The attention half of a decode step for B rows of one token each (Block.forward up to the router): x [B, D]
// in `dtype` (the residual stream) → x_out = x + out(attention(qkv(norm(x)))), t_out = mlp_norm(x_out), logits
// [B, E] = gate(t_out), every intermediate rounded to `dtype` where the torch code rounds. The dense weights
// are bf16 [out, in] with biases in `dtype`; cache and rope arguments as in decode_attention.
void decode_attention_block(const void* x, int64_t dtype, int64_t B, int64_t D, const float* attn_norm, float eps,
                            const uint16_t* qkv_w, const void* qkv_b, int64_t H, int64_t K, int64_t Dh,
                            const float* cos, const float* sin, float* cache_k, float* cache_v, int64_t* cache_pos,
                            int64_t S, const int64_t* slots, const int64_t* q_pos, int64_t window,
                            const float* sinks, const uint16_t* out_w, const void* out_b, const float* mlp_norm, const uint16_t* gate_w,
                            const void* gate_b, int64_t E, void* x_out, void* t_out, void* logits) {
  const size_t elem = dtype == kBF16 ? 2 : 4;
  const int64_t W = (H + 2 * K) * Dh;
  std::vector<uint8_t> t(B * D * elem), qkv(B * W * elem), a(B * H * Dh * elem), h(B * D * elem);
  rmsnorm(x, dtype, B, D, attn_norm, eps, t.data());
  bf16_linear(t.data(), dtype, B, D, qkv_w, W, qkv_b, dtype, qkv.data(), dtype);
  decode_attention(qkv.data(), dtype, B, H, K, Dh, cos, sin, cache_k, cache_v, cache_pos, S, slots, q_pos, window,
                   sinks, a.data());
  bf16_linear(a.data(), dtype, B, H * Dh, out_w, D, out_b, dtype, h.data(), dtype);
  for (int64_t i = 0; i < B * D; ++i)
    store_float(x_out, dtype, i, load_float(x, dtype, i) + load_float(h.data(), dtype, i));
  rmsnorm(x_out, dtype, B, D, mlp_norm, eps, t_out);
  bf16_linear(t_out, dtype, B, D, gate_w, E, gate_b, dtype, logits, dtype);
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
  long long x, x_dtype, M, K, w, N, bias, bias_dtype, out, out_dtype;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLL", &x, &x_dtype, &M, &K, &w, &N, &bias, &bias_dtype, &out, &out_dtype))
    return nullptr;
  return run_without_gil([&] {
    bf16_linear(ptr<const void>(x), x_dtype, M, K, ptr<const uint16_t>(w), N, ptr<const void>(bias), bias_dtype,
                ptr<void>(out), out_dtype);
  });
}

PyObject* py_int8_linear(PyObject*, PyObject* args) {
  long long x, x_dtype, M, K, w, scale, N, out;
  if (!PyArg_ParseTuple(args, "LLLLLLLL", &x, &x_dtype, &M, &K, &w, &scale, &N, &out)) return nullptr;
  return run_without_gil([&] {
    int8_linear(ptr<const void>(x), x_dtype, M, K, ptr<const int8_t>(w), ptr<const float>(scale), N, ptr<float>(out));
  });
}

PyObject* py_quantize_rows_int8(PyObject*, PyObject* args) {
  long long w, N, K, q, scale, err, norm;
  if (!PyArg_ParseTuple(args, "LLLLLLL", &w, &N, &K, &q, &scale, &err, &norm)) return nullptr;
  return run_without_gil([&] {
    quantize_rows_int8(ptr<const uint16_t>(w), N, K, ptr<int8_t>(q), ptr<float>(scale), ptr<float>(err), ptr<float>(norm));
  });
}

PyObject* py_int8_bounds(PyObject*, PyObject* args) {
  long long x, x_dtype, M, K, w, scale, row_bound, N, h_norm, temperature, noise, hi, max_lo;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLL", &x, &x_dtype, &M, &K, &w, &scale, &row_bound, &N, &h_norm,
                        &temperature, &noise, &hi, &max_lo))
    return nullptr;
  bool finite = true;
  PyObject* done = run_without_gil([&] {
    finite = int8_bounds(ptr<const void>(x), x_dtype, M, K, ptr<const int8_t>(w), ptr<const float>(scale),
                         ptr<const float>(row_bound), N, ptr<const float>(h_norm), ptr<const float>(temperature),
                         ptr<const float>(noise), ptr<float>(hi), ptr<float>(max_lo));
  });
  if (!done) return nullptr;
  Py_DECREF(done);
  return PyBool_FromLong(finite);
}

PyObject* py_swiglu(PyObject*, PyObject* args) {
  long long h, h_dtype, n, out, out_dtype;
  double alpha, limit;
  if (!PyArg_ParseTuple(args, "LLLddLL", &h, &h_dtype, &n, &alpha, &limit, &out, &out_dtype)) return nullptr;
  return run_without_gil([&] {
    swiglu(ptr<const void>(h), h_dtype, n, static_cast<float>(alpha), static_cast<float>(limit), ptr<void>(out),
           out_dtype);
  });
}

PyObject* py_rmsnorm(PyObject*, PyObject* args) {
  long long x, dtype, M, D, scale, out;
  double eps;
  if (!PyArg_ParseTuple(args, "LLLLLdL", &x, &dtype, &M, &D, &scale, &eps, &out)) return nullptr;
  return run_without_gil([&] {
    rmsnorm(ptr<const void>(x), dtype, M, D, ptr<const float>(scale), static_cast<float>(eps), ptr<void>(out));
  });
}

PyObject* py_decode_attention(PyObject*, PyObject* args) {
  long long qkv, dtype, B, H, K, Dh, cos, sin, ck, cv, cpos, S, slots, qpos, window, sinks, out;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLLLLLL", &qkv, &dtype, &B, &H, &K, &Dh, &cos, &sin, &ck, &cv, &cpos, &S,
                        &slots, &qpos, &window, &sinks, &out))
    return nullptr;
  return run_without_gil([&] {
    decode_attention(ptr<const void>(qkv), dtype, B, H, K, Dh, ptr<const float>(cos), ptr<const float>(sin),
                     ptr<float>(ck), ptr<float>(cv), ptr<int64_t>(cpos), S, ptr<const int64_t>(slots),
                     ptr<const int64_t>(qpos), window,
                     ptr<const float>(sinks), ptr<void>(out));
  });
}

PyObject* py_moe_experts(PyObject*, PyObject* args) {
  long long t, dtype, N, D, experts, weights, k, E, I, b1, s1, bias1, b2, s2, bias2, bias_dtype, residual, out;
  double alpha, limit;
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLLLLLddLL", &t, &dtype, &N, &D, &experts, &weights, &k, &E, &I, &b1, &s1,
                        &bias1, &b2, &s2, &bias2, &bias_dtype, &alpha, &limit, &residual, &out))
    return nullptr;
  return run_without_gil([&] {
    moe_experts(ptr<const void>(t), dtype, N, D, ptr<const int64_t>(experts), ptr<const float>(weights), k, E, I,
                ptr<const uint8_t>(b1), ptr<const uint8_t>(s1), ptr<const void>(bias1), ptr<const uint8_t>(b2),
                ptr<const uint8_t>(s2), ptr<const void>(bias2), bias_dtype, static_cast<float>(alpha),
                static_cast<float>(limit), ptr<const void>(residual), ptr<void>(out));
  });
}

PyObject* py_decode_attention_block(PyObject*, PyObject* args) {
  long long x, dtype, B, D, attn_norm, qkv_w, qkv_b, H, K, Dh, cos, sin, ck, cv, cpos, S, slots, qpos, window, sinks,
      out_w, out_b, mlp_norm, gate_w, gate_b, E, x_out, t_out, logits;
  double eps;
  if (!PyArg_ParseTuple(args, "LLLLLdLLLLLLLLLLLLLLLLLLLLLLLL", &x, &dtype, &B, &D, &attn_norm, &eps, &qkv_w, &qkv_b,
                        &H, &K, &Dh, &cos, &sin, &ck, &cv, &cpos, &S, &slots, &qpos, &window, &sinks, &out_w, &out_b,
                        &mlp_norm, &gate_w, &gate_b, &E, &x_out, &t_out, &logits))
    return nullptr;
  return run_without_gil([&] {
    decode_attention_block(ptr<const void>(x), dtype, B, D, ptr<const float>(attn_norm), static_cast<float>(eps),
                           ptr<const uint16_t>(qkv_w), ptr<const void>(qkv_b), H, K, Dh, ptr<const float>(cos),
                           ptr<const float>(sin), ptr<float>(ck), ptr<float>(cv), ptr<int64_t>(cpos), S,
                           ptr<const int64_t>(slots),
                           ptr<const int64_t>(qpos), window, ptr<const float>(sinks), ptr<const uint16_t>(out_w),
                           ptr<const void>(out_b), ptr<const float>(mlp_norm), ptr<const uint16_t>(gate_w),
                           ptr<const void>(gate_b), E, ptr<void>(x_out), ptr<void>(t_out), ptr<void>(logits));
  });
}

PyObject* py_simd(PyObject*, PyObject*) {
#if defined(GPTOSS_AVX512BF16)
  return PyUnicode_FromString("avx512bf16");
#elif defined(GPTOSS_AVX2)
  return PyUnicode_FromString("avx2");
#else
  return PyUnicode_FromString("scalar");
#endif
}

PyObject* py_amx(PyObject*, PyObject*) {
#ifdef GPTOSS_AMX
  if (amx_ready()) Py_RETURN_TRUE;
#endif
  Py_RETURN_FALSE;
}

PyObject* py_experts_kernel(PyObject*, PyObject*) {
  if (use_vdpbf16ps()) return PyUnicode_FromString("vdpbf16ps");
#if defined(GPTOSS_AVX512)
  return PyUnicode_FromString("vpermps");
#elif defined(GPTOSS_AVX2)
  return PyUnicode_FromString("vpshufb");
#else
  return PyUnicode_FromString("scalar");
#endif
}

PyMethodDef kMethods[] = {
    {"linear", py_linear, METH_VARARGS,
     "linear(x, x_dtype, M, K, blocks, scales, E, N, bias, bias_dtype, expert_ids, out): data pointers"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(blocks, scales, groups, out, out_dtype): data pointers"},
    {"bf16_linear", py_bf16_linear, METH_VARARGS,
     "bf16_linear(x, x_dtype, M, K, w_bf16, N, bias, bias_dtype, out, out_dtype): data pointers"},
    {"int8_linear", py_int8_linear, METH_VARARGS,
     "int8_linear(x, x_dtype, M, K, w_int8, scale_f32, N, out_f32): data pointers"},
    {"quantize_rows_int8", py_quantize_rows_int8, METH_VARARGS,
     "quantize_rows_int8(w_bf16, N, K, q_int8, scale_f32, err_f32, norm_f32): data pointers"},
    {"int8_bounds", py_int8_bounds, METH_VARARGS,
     "int8_bounds(x, x_dtype, M, K, w_int8, scale, row_bound, N, h_norm, temperature, noise, hi, max_lo) -> "
     "all finite: data pointers (0 for no temperature / noise)"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(x, dtype, M, D, scale_f32, eps, out): data pointers"},
    {"swiglu", py_swiglu, METH_VARARGS, "swiglu(h, h_dtype, n_pairs, alpha, limit, out, out_dtype): data pointers"},
    {"decode_attention", py_decode_attention, METH_VARARGS,
     "decode_attention(qkv, dtype, B, H, K, Dh, cos, sin, cache_k, cache_v, cache_pos, S, slots, q_pos, window, "
     "sinks, out): data pointers"},
    {"moe_experts", py_moe_experts, METH_VARARGS,
     "moe_experts(t, dtype, N, D, experts, weights, k, E, I, blocks1, scales1, bias1, blocks2, scales2, bias2, "
     "bias_dtype, alpha, limit, residual, out): data pointers"},
    {"decode_attention_block", py_decode_attention_block, METH_VARARGS,
     "decode_attention_block(x, dtype, B, D, attn_norm, eps, qkv_w, qkv_b, H, K, Dh, cos, sin, cache_k, cache_v, "
     "cache_pos, S, slots, q_pos, window, sinks, out_w, out_b, mlp_norm, gate_w, gate_b, E, x_out, t_out, logits)"},
    {"simd", py_simd, METH_NOARGS, "the instruction set this build uses: 'avx512bf16', 'avx2' or 'scalar'"},
    {"amx", py_amx, METH_NOARGS,
     "whether experts with several bf16 rows run on AMX tiles here (built for them and granted by the kernel)"},
    {"experts_kernel", py_experts_kernel, METH_NOARGS,
     "the MXFP4 expert kernel bf16 activations take here: 'vdpbf16ps', 'vpermps', 'vpshufb' or 'scalar'"},
    {nullptr, nullptr, 0, nullptr}};

#define GPTOSS_STR2(x) #x
#define GPTOSS_STR(x) GPTOSS_STR2(x)
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, GPTOSS_STR(TORCH_EXTENSION_NAME), "gptoss MXFP4 CPU kernels", -1,
                       kMethods};

}  // namespace

#define GPTOSS_PYINIT2(name) PyInit_##name
#define GPTOSS_PYINIT(name) GPTOSS_PYINIT2(name)
PyMODINIT_FUNC GPTOSS_PYINIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
