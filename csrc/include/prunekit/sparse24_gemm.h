// 2:4 decode GEMM on mma.sp (sm_80+): y[M, N] = x[M, K] · W[N, K]ᵀ + bias, W in the logical 2:4 format
// (values [N, K/2], meta uint8 [N, K/8]; DESIGN.md §5). See csrc/cuda/sparse24_gemm.cu for the layout.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

constexpr int kSparse24MaxTokens = 64;  // M per launch (8 n-tiles of 8 tokens)
constexpr int kSparse24ChunkK = 64;     // K must be a multiple of this
constexpr int kSparse24RowsPerBlock = 64;

// x [M, K], values [N, K/2], bias [N] or null, y [M, N] (dtype: kBFloat16 or kFloat16);
// workspace: float32 [splits, M, N]. Alignment: values 16 B, meta 8 B, x 4 B.
// Split s reduces K chunks [s * chunks_per_split, (s + 1) * chunks_per_split).
// On kCudaError the launch error is left pending: read (and clear) it with cudaGetLastError().
Status sparse24_decode_gemm(const void* x, const void* values, const std::uint8_t* meta, const void* bias, void* y,
                            float* workspace, std::int64_t M, std::int64_t N, std::int64_t K, int splits,
                            int chunks_per_split, DType dtype, cudaStream_t stream);

// The sparse MMA instruction this build emits: "mma.sp::ordered_metadata" (CUDA >= 12.5) or "mma.sp".
const char* sparse24_mma_sp_form();

}  // namespace prunekit
