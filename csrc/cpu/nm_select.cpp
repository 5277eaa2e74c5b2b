// Per-row and N:M keep-mask selection (see prunekit/nm_select.h). Rows are independent, so OpenMP
// splits them across threads; each thread owns its scratch buffers.
#include "prunekit/nm_select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace prunekit {
namespace {

// A uint32 whose unsigned order is the order of the float (-0.0 and +0.0 map to the same key,
// as they compare equal in a sort).
inline std::uint32_t order_key(float x) {
  if (x == 0.0f) x = 0.0f;
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float half_abs_to_float(std::uint16_t h) {
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) return std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal, exact
  const std::uint32_t bits = exp == 31 ? (0x7f800000u | (mant << 13)) : (((exp + 112u) << 23) | (mant << 13));
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline float bf16_abs_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b & 0x7fffu) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// |W[i]| as float32 for the supported weight dtypes.
inline float abs_weight(const void* w, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return half_abs_to_float(static_cast<const std::uint16_t*>(w)[i]);
    case DType::kBFloat16: return bf16_abs_to_float(static_cast<const std::uint16_t*>(w)[i]);
    default: return std::fabs(static_cast<const float*>(w)[i]);
  }
}

// Prune the k smallest keys of one row: find the k-th smallest key T, prune everything below T and
// the first (k - #below) entries equal to T, which is what a stable ascending sort prunes.
void select_row(const std::uint32_t* keys, std::uint8_t* keep, std::int64_t width, std::int64_t k,
                std::vector<std::uint32_t>& scratch) {
  if (k <= 0) {
    std::fill(keep, keep + width, std::uint8_t{1});
    return;
  }
  scratch.assign(keys, keys + width);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
  const std::uint32_t threshold = scratch[k - 1];
  std::int64_t below = 0;
  for (std::int64_t i = 0; i < width; ++i) below += keys[i] < threshold;
  std::int64_t ties_to_prune = k - below;
  for (std::int64_t i = 0; i < width; ++i) {
    bool kept = keys[i] > threshold;
    if (keys[i] == threshold) kept = ties_to_prune-- <= 0;
    keep[i] = kept;
  }
}

// In one group of m scores, prune the m - n lowest; an entry's rank counts the entries that a
// stable sort places before it.
inline void select_group(const float* s, std::uint8_t* keep, int n, int m) {
  for (int i = 0; i < m; ++i) {
    int rank = 0;
    for (int j = 0; j < m; ++j) rank += (s[j] < s[i]) || (s[j] == s[i] && j < i);
    keep[i] = rank >= m - n;
  }
}

bool valid_nm(std::int64_t width, int n, int m) { return m >= 2 && n >= 1 && n < m && width % m == 0; }

}  // namespace

Status row_keep_mask_f32(const float* scores, std::uint8_t* keep, std::int64_t rows, std::int64_t width,
                         std::int64_t n_prune) {
  if (rows < 0 || width < 0 || n_prune < 0 || n_prune > width) return Status::kInvalidArgument;
#pragma omp parallel
  {
    std::vector<std::uint32_t> keys(width), scratch;
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* row = scores + r * width;
      for (std::int64_t i = 0; i < width; ++i) keys[i] = order_key(row[i]);
      select_row(keys.data(), keep + r * width, width, n_prune, scratch);
    }
  }
  return Status::kOk;
}

Status nm_keep_mask_f32(const float* scores, std::uint8_t* keep, std::int64_t rows, std::int64_t width,
                        int n, int m) {
  if (rows < 0 || !valid_nm(width, n, m)) return Status::kInvalidArgument;
  const std::int64_t groups = rows * (width / m);
#pragma omp parallel for schedule(static)
  for (std::int64_t g = 0; g < groups; ++g) select_group(scores + g * m, keep + g * m, n, m);
  return Status::kOk;
}

Status wanda_keep_mask(const void* weight, DType dtype, const float* sqrt_norm, std::uint8_t* keep,
                       std::int64_t rows, std::int64_t width, std::int64_t n_prune, int n, int m) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return Status::kUnsupported;
  if (rows < 0 || width < 0) return Status::kInvalidArgument;
  if (m != 0 && !valid_nm(width, n, m)) return Status::kInvalidArgument;
  if (m == 0 && (n_prune < 0 || n_prune > width)) return Status::kInvalidArgument;
#pragma omp parallel
  {
    std::vector<float> score(width);
    std::vector<std::uint32_t> keys(m == 0 ? width : 0), scratch;
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t i = 0; i < width; ++i) score[i] = abs_weight(weight, dtype, r * width + i) * sqrt_norm[i];
      std::uint8_t* keep_row = keep + r * width;
      if (m == 0) {
        for (std::int64_t i = 0; i < width; ++i) keys[i] = order_key(score[i]);
        select_row(keys.data(), keep_row, width, n_prune, scratch);
      } else {
        for (std::int64_t g = 0; g < width; g += m) select_group(score.data() + g, keep_row + g, n, m);
      }
    }
  }
  return Status::kOk;
}

}  // namespace prunekit
