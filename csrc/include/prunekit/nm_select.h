// Mask selection kernels on the CPU (csrc/cpu/nm_select.cpp). Keep masks are one byte per entry,
// 1 = kept. Ties are broken like a stable ascending sort: among equal scores the lower index is
// pruned first, so the masks equal prunekit/ref/selection.py bit for bit.
#pragma once
#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

// Per row of a row-major [rows, width] float32 score matrix, prune the n_prune lowest scores.
Status row_keep_mask_f32(const float* scores, std::uint8_t* keep, std::int64_t rows, std::int64_t width,
                         std::int64_t n_prune);

// In every group of m consecutive scores of a row keep the n highest (prune m - n).
Status nm_keep_mask_f32(const float* scores, std::uint8_t* keep, std::int64_t rows, std::int64_t width,
                        int n, int m);

// Wanda in one pass: score |W| * sqrt_norm[col] in float32, then select per row (m == 0, pruning
// n_prune per row) or per group of m (keeping n). W is row-major [rows, width] of `dtype`
// (float32, float16 or bfloat16).
Status wanda_keep_mask(const void* weight, DType dtype, const float* sqrt_norm, std::uint8_t* keep,
                       std::int64_t rows, std::int64_t width, std::int64_t n_prune, int n, int m);

}  // namespace prunekit
