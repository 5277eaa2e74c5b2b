// Portable path: plain loops (the compiler may vectorize them for the baseline target). Also the oracle-
// shaped fallback for CPUs without AVX2.
#include "common.h"

namespace prunekit {
namespace scalar {
namespace {

template <typename W>
void s24_gemv_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K;
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n)
    a.y[n] = s24_dot_groups(values + n * (K / 2), a.meta + n * (K / 8), a.x, 0, K / 4);
}

template <typename W>
void s24_gemm_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t K = a.K;
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    float* yrow = a.y + n * a.ld;
    for (std::int64_t t = 0; t < a.ld; ++t) yrow[t] = 0.f;
    s24_axpy_groups(values + n * (K / 2), a.meta + n * (K / 8), a.x, a.ld, 0, a.ld, yrow, 0, K / 4);
  }
}

template <typename W>
void bm_gemv_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t nbytes = a.K / 8;
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    const W* v = values + a.row_offsets[n];
    const std::uint8_t* mk = a.meta + n * nbytes;
    float s = 0.f;
    for (std::int64_t b = 0; b < nbytes; ++b)
      for (unsigned bits = mk[b]; bits; bits &= bits - 1) s += to_f32(*v++) * a.x[8 * b + __builtin_ctz(bits)];
    a.y[n] = s;
  }
}

template <typename W>
void bm_gemm_t(const CpuKernelArgs& a) {
  const W* values = static_cast<const W*>(a.values);
  const std::int64_t nbytes = a.K / 8, ld = a.ld;
#pragma omp parallel for schedule(static) num_threads(a.threads)
  for (std::int64_t n = 0; n < a.N; ++n) {
    const W* v = values + a.row_offsets[n];
    const std::uint8_t* mk = a.meta + n * nbytes;
    float* yrow = a.y + n * ld;
    for (std::int64_t t = 0; t < ld; ++t) yrow[t] = 0.f;
    for (std::int64_t b = 0; b < nbytes; ++b)
      for (unsigned bits = mk[b]; bits; bits &= bits - 1) {
        const float w = to_f32(*v++);
        const float* xp = a.x + (8 * b + __builtin_ctz(bits)) * ld;
        for (std::int64_t t = 0; t < ld; ++t) yrow[t] += w * xp[t];
      }
  }
}

}  // namespace

void s24_gemv(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, s24_gemv_t, a); }
void s24_gemm(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, s24_gemm_t, a); }
void bm_gemv(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, bm_gemv_t, a); }
void bm_gemm(const CpuKernelArgs& a) { PRUNEKIT_BY_DTYPE(a.dtype, bm_gemm_t, a); }

}  // namespace scalar
}  // namespace prunekit
