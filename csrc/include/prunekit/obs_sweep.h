// SparseGPT's in-block OBS sweep (DESIGN.md §4): prune one block of B columns and spread each pruned
// weight's error over the remaining columns of the block. Rows are independent given the block's
// inverse-Hessian factor. The plain PyTorch reference is python/prunekit/ref/obs_sweep.py.
#pragma once

#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

// w        [rows, B] float32, the block's weights (already updated by earlier blocks); read only.
// hinv     [B, B] float32, the block's tile of the upper Cholesky factor of H^-1 (upper triangle read).
// keep     [rows, B] bool (1 byte), kept-mask for unstructured pruning (m == 0); ignored when m > 0.
// q        [rows, B] float32 out: pruned and updated weights.
// err      [rows, B] float32 out: (w - q) / d per column.
// loss     [rows] float32 out: sum over the block of (w - q)^2 / d^2, halved.
// keep_out [rows, B] bool out: the mask applied (for N:M, the one chosen every m columns from the
//          updated weights: n kept of m, ties prune the lower index first).
// Status: kInvalidArgument for B < 1, rows < 0, m < 0 or m > 64, or m > 0 with B % m != 0 or n
// outside [1, m); kNumerical when a pivot hinv[i][i] is not a finite positive number.
Status obs_sweep_cpu(const float* w, const float* hinv, const uint8_t* keep, float* q, float* err,
                     float* loss, uint8_t* keep_out, int64_t rows, int64_t B, int64_t n, int64_t m);

}  // namespace prunekit
