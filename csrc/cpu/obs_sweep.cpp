// CPU OBS sweep: one row at a time (rows are independent), OpenMP over rows. The arithmetic mirrors
// the PyTorch reference operation for operation (product rounded, then subtracted; squares divided),
// so the N:M choices, which compare such values, come out identical to it.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "prunekit/obs_sweep.h"

#include <cmath>
#include <vector>

namespace prunekit {
namespace {

// Keep the n highest of the m scores, pruning the lower index first on ties (a stable ascending
// sort prunes its first m - n): an entry is pruned when fewer than m - n entries precede it.
void select_nm(const float* row, const float* diag, int64_t n, int64_t m, uint8_t* keep) {
  constexpr int64_t kMaxM = 64;
  float scores[kMaxM];
  for (int64_t k = 0; k < m; ++k) {
    const float sq = row[k] * row[k];
    const float dd = diag[k] * diag[k];
    scores[k] = sq / dd;
  }
  for (int64_t k = 0; k < m; ++k) {
    int64_t before = 0;
    for (int64_t j = 0; j < m; ++j) {
      if (scores[j] < scores[k] || (scores[j] == scores[k] && j < k)) ++before;
    }
    keep[k] = before >= m - n ? 1 : 0;
  }
}

void sweep_row(const float* w, const float* hinv, const float* diag, const uint8_t* keep,
               float* q, float* err, float* loss, uint8_t* keep_out, int64_t B, int64_t n,
               int64_t m, float* buf) {
  for (int64_t j = 0; j < B; ++j) buf[j] = w[j];
  if (m == 0) {
    for (int64_t j = 0; j < B; ++j) keep_out[j] = keep[j] ? 1 : 0;
  }
  double total = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    if (m > 0 && i % m == 0) select_nm(buf + i, diag + i, n, m, keep_out + i);
    const float wi = buf[i];
    const float qi = keep_out[i] ? wi : 0.0f;
    const float d = diag[i];
    const float diff = wi - qi;
    const float sq = diff * diff;
    const float dd = d * d;
    total += static_cast<double>(sq / dd);
    const float e = diff / d;
    q[i] = qi;
    err[i] = e;
    if (e == 0.0f) continue;  // a kept weight moves nothing (x - 0*h == x)
    const float* h = hinv + i * B;
    for (int64_t j = i + 1; j < B; ++j) {
      const float prod = e * h[j];
      buf[j] = buf[j] - prod;
    }
  }
  *loss = static_cast<float>(total / 2.0);
}

}  // namespace

Status obs_sweep_cpu(const float* w, const float* hinv, const uint8_t* keep, float* q, float* err,
                     float* loss, uint8_t* keep_out, int64_t rows, int64_t B, int64_t n, int64_t m) {
  if (rows < 0 || B < 1 || m < 0 || m > 64) return Status::kInvalidArgument;
  if (m > 0 && (B % m != 0 || n < 1 || n >= m)) return Status::kInvalidArgument;
  std::vector<float> diag(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    diag[i] = hinv[i * B + i];
    if (!std::isfinite(diag[i]) || !(diag[i] > 0.0f)) return Status::kNumerical;
  }
#pragma omp parallel
  {
    std::vector<float> buf(static_cast<size_t>(B));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = r * B;
      sweep_row(w + off, hinv, diag.data(), keep + off, q + off, err + off, loss + r,
                keep_out + off, B, n, m, buf.data());
    }
  }
  return Status::kOk;
}

}  // namespace prunekit
