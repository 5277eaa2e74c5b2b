// AVX2 + FMA + F16C path (compiled with -mavx2 -mfma -mf16c; called only when the CPU has them). M > 1:
// simd_kernels.inc with 8-float vectors.
//  2:4, M == 1: per 16 inputs (8 stored values, 2 meta bytes) the 2-bit positions become lane indices; two
//    vpermps (one per 8-float half of x) and a blend on index bit 3 gather x in registers.
//  bitmask, M == 1: per 8 inputs, 8 values loaded and spread to their lanes by a 256-entry permute table.
#include <immintrin.h>

#include "common.h"

namespace prunekit {
namespace avx2 {
namespace {

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const Bf16* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
static inline __m256 load8(const Fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

struct V {
  using R = __m256;
  static constexpr int kW = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R set1(float f) { return _mm256_set1_ps(f); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  template <typename W>
  static R loadw(const W* p) { return load8(p); }
};

#include "simd_kernels.inc"

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename W>
void s24_gemv_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K, chunks = K / 16;
  const float* x = a.x;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
#pragma omp parallel for schedule(dynamic, 32) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    const W* v = values + n * (K / 2);
    const std::uint8_t* mt = a.meta + n * (K / 8);
    // two named accumulators (an array indexed by c & 1 is kept on the stack: a store/load per chunk)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    auto chunk = [&](std::int64_t c, __m256 acc) {
      std::uint16_t m;
      std::memcpy(&m, mt + 2 * c, 2);
      __m256i idx = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(m), shifts), three), base);
      __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 16 * c), idx);
      __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 16 * c + 8), idx);
      __m256 xs = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      return _mm256_fmadd_ps(load8(v + 8 * c), xs, acc);
    };
    std::int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      acc0 = chunk(c, acc0);
      acc1 = chunk(c + 1, acc1);
    }
    if (c < chunks) acc0 = chunk(c, acc0);
    a.y[n] = hsum(_mm256_add_ps(acc0, acc1)) + s24_dot_groups(v, mt, x, chunks * 4, K / 4);
  }
}

// For each byte of mask bits: lane i takes source element rank(i) = number of set bits below i.
struct ExpandTable {
  std::int32_t idx[256][8];
};
constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int m = 0; m < 256; ++m) {
    int r = 0;
    for (int i = 0; i < 8; ++i) {
      t.idx[m][i] = (m >> i) & 1 ? r : 0;
      r += (m >> i) & 1;
    }
  }
  return t;
}
alignas(32) constexpr ExpandTable kExpand = make_expand_table();

template <typename W>
void bm_gemv_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K, nb = K / 8;
  const float* x = a.x;
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
#pragma omp parallel for schedule(dynamic, 32) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    const W* vp = values + a.row_offsets[n];
    const std::uint8_t* mk = a.meta + n * nb;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // named: see s24_gemv_t
    auto byte = [&](std::int64_t b, __m256 acc) {
      const unsigned m = mk[b];
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m]));
      const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), lane_bits), lane_bits);
      const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(vp), perm), _mm256_castsi256_ps(on));
      vp += __builtin_popcount(m);
      return _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * b), acc);
    };
    std::int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      acc0 = byte(b, acc0);
      acc1 = byte(b + 1, acc1);
    }
    if (b < nb) acc0 = byte(b, acc0);
    a.y[n] = hsum(_mm256_add_ps(acc0, acc1));
  }
}

}  // namespace

void s24_gemv(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, s24_gemv_t, a); }
void s24_gemm(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, s24_gemm_t, a); }
void bm_gemv(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, bm_gemv_t, a); }
void bm_gemm(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, bm_gemm_t, a); }

}  // namespace avx2
}  // namespace prunekit
