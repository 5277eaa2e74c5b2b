// SparseGPT's in-block OBS sweep on CUDA: one launch per block of B <= 128 columns (DESIGN.md §4).
// Semantics are those of prunekit.ref.obs_sweep (IST-DASLab/sparsegpt fasterprune inner loop).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {
namespace cuda {

constexpr int kObsSweepMaxBlock = 128;

// All arrays are device pointers, fp32 / 1-byte bool, contiguous row-major:
//   w, q, err, keep, keep_out: [rows, B]; hinv: [B, B] (upper Cholesky factor of H^-1, block diagonal
//   part); loss: [rows]. n = kept of every m (m = 0: unstructured, keep is the mask; m > 0: keep is
//   ignored and B % m == 0). On kCudaError, *cuda_error points at the runtime's (static) message.
Status obs_sweep(const float* w, const float* hinv, const std::uint8_t* keep, float* q, float* err,
                 float* loss, std::uint8_t* keep_out, std::int64_t rows, int B, int n, int m,
                 cudaStream_t stream, const char** cuda_error);

}  // namespace cuda
}  // namespace prunekit
