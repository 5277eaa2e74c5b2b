// AVX2 + FMA + F16C path (compiled with -mavx2 -mfma -mf16c; called only when the CPU has them). Same
// structure as avx512.cpp with 8-float vectors:
//  2:4, M == 1: per 16 inputs (8 stored values, 2 meta bytes) the 2-bit positions become lane indices; two
//    vpermps (one per 8-float half of x) and a blend on index bit 3 gather x in registers.
//  bitmask, M == 1: per 8 inputs, 8 values loaded and spread to their lanes by a 256-entry permute table.
#include <immintrin.h>

#include "common.h"

namespace prunekit {
namespace avx2 {
namespace {

constexpr int kTW = 8;
constexpr std::int64_t kRowBlock = 32;  // rows sharing one L1-resident block of xT

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const Bf16* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
static inline __m256 load8(const Fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

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
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (std::int64_t c = 0; c < chunks; ++c) {
      std::uint16_t m;
      std::memcpy(&m, mt + 2 * c, 2);
      __m256i idx = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(m), shifts), three), base);
      __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 16 * c), idx);
      __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 16 * c + 8), idx);
      __m256 xs = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      acc[c & 1] = _mm256_fmadd_ps(load8(v + 8 * c), xs, acc[c & 1]);
    }
    a.y[n] = hsum(_mm256_add_ps(acc[0], acc[1])) + s24_dot_groups(v, mt, x, chunks * 4, K / 4);
  }
}

template <typename W, int T>
static inline void s24_tile(const W* v, const std::uint8_t* mt, const float* xT, std::int64_t ld, std::int64_t t0,
                            float* yrow, std::int64_t k0, std::int64_t k1, std::int64_t K) {
  constexpr int S = T == 1 ? 4 : 2;
  __m256 acc[S][T];
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t) acc[s][t] = _mm256_setzero_ps();
  if (k0 > 0)
    for (int t = 0; t < T; ++t) acc[0][t] = _mm256_loadu_ps(yrow + t0 + kTW * t);
  const std::int64_t c0 = k0 / 16, c1 = k1 / 16;
  alignas(32) float wf[8];
  for (std::int64_t c = c0; c < c1; ++c) {
    std::uint16_t m;
    std::memcpy(&m, mt + 2 * c, 2);
    _mm256_store_ps(wf, load8(v + 8 * c));
    const float* xb = xT + 16 * c * ld + t0;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const float* xp = xb + (4 * (j >> 1) + ((m >> (2 * j)) & 3)) * ld;
      const __m256 w = _mm256_set1_ps(wf[j]);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[j % S][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + kTW * t), acc[j % S][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    __m256 s = acc[0][t];
    for (int q = 1; q < S; ++q) s = _mm256_add_ps(s, acc[q][t]);
    _mm256_storeu_ps(yrow + t0 + kTW * t, s);
  }
  if (k1 == K && c1 * 16 < K) s24_axpy_groups(v, mt, xT, ld, t0, kTW * T, yrow + t0, c1 * 4, K / 4);
}

static inline std::int64_t k_block(int T, std::int64_t align) {
  std::int64_t kb = (32 * 1024) / (T * kTW * 4);
  kb = (kb / align) * align;
  return kb < align ? align : kb;
}

template <typename W>
void s24_gemm_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K, ld = a.ld, nrb = (a.N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(a.threads)
  for (std::int64_t rb = 0; rb < nrb; ++rb) {
    const std::int64_t n0 = rb * kRowBlock, n1 = min64(a.N, n0 + kRowBlock);
    for (std::int64_t t0 = 0; t0 < ld; t0 += 4 * kTW) {
      const int T = static_cast<int>(min64(4, (ld - t0) / kTW));
      const std::int64_t kb = k_block(T, 16);
      for (std::int64_t k0 = 0; k0 < K || k0 == 0; k0 += kb) {
        const std::int64_t k1 = min64(K, k0 + kb);
        for (std::int64_t n = n0; n < n1; ++n) {
          const W* v = values + n * (K / 2);
          const std::uint8_t* mt = a.meta + n * (K / 8);
          float* yrow = a.y + n * ld;
          switch (T) {
            case 1: s24_tile<W, 1>(v, mt, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, K); break;
            case 2: s24_tile<W, 2>(v, mt, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, K); break;
            case 3: s24_tile<W, 3>(v, mt, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, K); break;
            default: s24_tile<W, 4>(v, mt, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, K); break;
          }
        }
        if (K == 0) break;
      }
    }
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
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (std::int64_t b = 0; b < nb; ++b) {
      const unsigned m = mk[b];
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[m]));
      const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), lane_bits), lane_bits);
      const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(vp), perm), _mm256_castsi256_ps(on));
      vp += __builtin_popcount(m);
      acc[b & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * b), acc[b & 1]);
    }
    a.y[n] = hsum(_mm256_add_ps(acc[0], acc[1]));
  }
}

static inline std::uint64_t mask_word(const std::uint8_t* mk, std::int64_t w, std::int64_t nb) {
  std::uint64_t bits = 0;
  const std::int64_t avail = min64(8, nb - 8 * w);
  std::memcpy(&bits, mk + 8 * w, static_cast<size_t>(avail));
  return bits;
}

template <typename W, int T>
static inline void bm_tile(const W* values, std::int64_t* cursor, const std::uint8_t* mk, const float* xT,
                           std::int64_t ld, std::int64_t t0, float* yrow, std::int64_t k0, std::int64_t k1,
                           std::int64_t nb) {
  __m256 acc[2][T];
  for (int t = 0; t < T; ++t) {
    acc[0][t] = k0 > 0 ? _mm256_loadu_ps(yrow + t0 + kTW * t) : _mm256_setzero_ps();
    acc[1][t] = _mm256_setzero_ps();
  }
  const W* vp = values + *cursor;
  const float* xb = xT + t0;
  for (std::int64_t w = k0 / 64; w * 64 < k1; ++w) {
    std::uint64_t bits = mask_word(mk, w, nb);
    const float* xw = xb + 64 * w * ld;
    while (bits) {
      const __m256 w0 = _mm256_set1_ps(to_f32(*vp++));
      const float* x0 = xw + __builtin_ctzll(bits) * ld;
      bits &= bits - 1;
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[0][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + kTW * t), acc[0][t]);
      if (!bits) break;
      const __m256 w1 = _mm256_set1_ps(to_f32(*vp++));
      const float* x1 = xw + __builtin_ctzll(bits) * ld;
      bits &= bits - 1;
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[1][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + kTW * t), acc[1][t]);
    }
  }
  *cursor = vp - values;
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(yrow + t0 + kTW * t, _mm256_add_ps(acc[0][t], acc[1][t]));
}

template <typename W>
void bm_gemm_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K, ld = a.ld, nb = K / 8, nrb = (a.N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(a.threads)
  for (std::int64_t rb = 0; rb < nrb; ++rb) {
    const std::int64_t n0 = rb * kRowBlock, n1 = min64(a.N, n0 + kRowBlock);
    std::int64_t cursor[kRowBlock];
    for (std::int64_t t0 = 0; t0 < ld; t0 += 4 * kTW) {
      const int T = static_cast<int>(min64(4, (ld - t0) / kTW));
      const std::int64_t kb = k_block(T, 64);
      for (std::int64_t n = n0; n < n1; ++n) cursor[n - n0] = a.row_offsets[n];
      for (std::int64_t k0 = 0; k0 < K || k0 == 0; k0 += kb) {
        const std::int64_t k1 = min64(K, k0 + kb);
        for (std::int64_t n = n0; n < n1; ++n) {
          const std::uint8_t* mk = a.meta + n * nb;
          float* yrow = a.y + n * ld;
          std::int64_t* cur = cursor + (n - n0);
          switch (T) {
            case 1: bm_tile<W, 1>(values, cur, mk, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, nb); break;
            case 2: bm_tile<W, 2>(values, cur, mk, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, nb); break;
            case 3: bm_tile<W, 3>(values, cur, mk, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, nb); break;
            default: bm_tile<W, 4>(values, cur, mk, a.x + t0 * K, kTW * T, 0, yrow + t0, k0, k1, nb); break;
          }
        }
        if (K == 0) break;
      }
    }
  }
}


}  // namespace

void s24_gemv(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, s24_gemv_t, a); }
void s24_gemm(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, s24_gemm_t, a); }
void bm_gemv(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, bm_gemv_t, a); }
void bm_gemm(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, bm_gemm_t, a); }

}  // namespace avx2
}  // namespace prunekit
