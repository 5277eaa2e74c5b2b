// AVX-512F path (compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; called only when the CPU has them).
//  2:4, M == 1: per chunk of 32 inputs (16 stored values, 4 meta bytes) the 16 2-bit positions of the meta
//    word become 16 lane indices (shift, mask, + group base) and one vpermt2ps gathers x from two registers.
//  2:4, M > 1: x transposed (tokens contiguous); each stored weight is broadcast and multiplies one vector
//    of up to 64 tokens: half the FMAs of dense, no gather. K is blocked so the xT tile stays in L2.
//  bitmask, M == 1: per 16 inputs, 16 values are loaded and vexpandps places them by the mask bits.
//  bitmask, M > 1: set bits walked with tzcnt; each value times a token vector, as for 2:4.
#include <immintrin.h>

#include "common.h"

namespace prunekit {
namespace avx512 {
namespace {

constexpr int kTW = 16;
constexpr std::int64_t kRowBlock = 32;  // rows sharing one L1-resident block of xT

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const Bf16* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline __m512 load16(const Fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename W>
void s24_gemv_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K, chunks = K / 32;
  const float* x = a.x;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
#pragma omp parallel for schedule(dynamic, 32) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    const W* v = values + n * (K / 2);
    const std::uint8_t* mt = a.meta + n * (K / 8);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (std::int64_t c = 0; c < chunks; ++c) {
      std::uint32_t m;
      std::memcpy(&m, mt + 4 * c, 4);
      __m512i idx = _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(m)), shifts), three), base);
      __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(x + 32 * c), idx, _mm512_loadu_ps(x + 32 * c + 16));
      acc[c & 1] = _mm512_fmadd_ps(load16(v + 16 * c), xs, acc[c & 1]);
    }
    a.y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + s24_dot_groups(v, mt, x, chunks * 8, K / 4);
  }
}

template <typename W, int T>
static inline void s24_tile(const W* v, const std::uint8_t* mt, const float* xT, std::int64_t ld, std::int64_t t0,
                            float* yrow, std::int64_t k0, std::int64_t k1, std::int64_t K) {
  constexpr int S = T == 1 ? 4 : 2;
  __m512 acc[S][T];
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t) acc[s][t] = _mm512_setzero_ps();
  if (k0 > 0)
    for (int t = 0; t < T; ++t) acc[0][t] = _mm512_loadu_ps(yrow + t0 + kTW * t);
  const std::int64_t c0 = k0 / 32, c1 = k1 / 32;
  alignas(64) float wf[16];
  for (std::int64_t c = c0; c < c1; ++c) {
    std::uint32_t m;
    std::memcpy(&m, mt + 4 * c, 4);
    _mm512_store_ps(wf, load16(v + 16 * c));
    const float* xb = xT + 32 * c * ld + t0;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const float* xp = xb + (4 * (j >> 1) + ((m >> (2 * j)) & 3)) * ld;
      const __m512 w = _mm512_set1_ps(wf[j]);
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[j % S][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + kTW * t), acc[j % S][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    __m512 s = acc[0][t];
    for (int q = 1; q < S; ++q) s = _mm512_add_ps(s, acc[q][t]);
    _mm512_storeu_ps(yrow + t0 + kTW * t, s);
  }
  if (k1 == K && c1 * 32 < K) s24_axpy_groups(v, mt, xT, ld, t0, kTW * T, yrow + t0, c1 * 8, K / 4);
}

// L2-sized K blocks of the xT tile, a multiple of `align` inputs.
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
      const std::int64_t kb = k_block(T, 32);
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


template <typename W>
void bm_gemv_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K, nb = K / 8, c16 = K / 16;
  const float* x = a.x;
#pragma omp parallel for schedule(dynamic, 32) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    const W* vp = values + a.row_offsets[n];
    const std::uint8_t* mk = a.meta + n * nb;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (std::int64_t c = 0; c < c16; ++c) {
      std::uint16_t m;
      std::memcpy(&m, mk + 2 * c, 2);
      const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), load16(vp));
      vp += __builtin_popcount(m);
      acc[c & 1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16 * c), acc[c & 1]);
    }
    if (nb & 1) {  // last 8 inputs
      const unsigned m = mk[nb - 1];
      const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), load16(vp));
      acc[0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(0xFF, x + 16 * c16), acc[0]);
    }
    a.y[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
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
  __m512 acc[2][T];
  for (int t = 0; t < T; ++t) {
    acc[0][t] = k0 > 0 ? _mm512_loadu_ps(yrow + t0 + kTW * t) : _mm512_setzero_ps();
    acc[1][t] = _mm512_setzero_ps();
  }
  const W* vp = values + *cursor;
  const float* xb = xT + t0;
  for (std::int64_t w = k0 / 64; w * 64 < k1; ++w) {
    std::uint64_t bits = mask_word(mk, w, nb);
    const float* xw = xb + 64 * w * ld;
    while (bits) {
      const __m512 w0 = _mm512_set1_ps(to_f32(*vp++));
      const float* x0 = xw + __builtin_ctzll(bits) * ld;
      bits &= bits - 1;
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[0][t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x0 + kTW * t), acc[0][t]);
      if (!bits) break;
      const __m512 w1 = _mm512_set1_ps(to_f32(*vp++));
      const float* x1 = xw + __builtin_ctzll(bits) * ld;
      bits &= bits - 1;
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) acc[1][t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x1 + kTW * t), acc[1][t]);
    }
  }
  *cursor = vp - values;
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(yrow + t0 + kTW * t, _mm512_add_ps(acc[0][t], acc[1][t]));
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

}  // namespace avx512
}  // namespace prunekit
