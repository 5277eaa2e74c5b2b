// 2:4 prefill GEMM on Hopper (CUTLASS 3.x sm90 sparse GEMM: wgmma.sp + TMA, warp-specialized):
// y[M, N] = x[M, K] · W[N, K]ᵀ + bias, computed as yᵀ = W · xᵀ with W the sparse A operand.
// W must first be converted to CUTLASS's sm90 compressed A + metadata (not the logical format of
// DESIGN.md §5, and not the sm80 layout): sparse24_sm90_compress, once per weight and device.
// Only compiled when CUTLASS was found at build time (PRUNEKIT_HAVE_CUTLASS).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

// False when this build's CUDA (< 12.2) has no sm90 sparse GEMM; every call then returns kUnsupported.
bool sparse24_sm90_compiled();

// Bytes of the buffers the compressor writes for an [N, K] weight (dtype kBFloat16 or kFloat16).
struct Sparse24Sm90Sizes {
  std::int64_t compressed_bytes = 0;   // CUTLASS compressed A (padded K)
  std::int64_t metadata_bytes = 0;     // CUTLASS sm90 metadata E (padded to its 64 x 128 atoms)
  std::int64_t compress_workspace_bytes = 0;
};

// Fails with kInvalidArgument when the shape is not supported (K % 16, N % 8 rules below).
Status sparse24_sm90_sizes(std::int64_t N, std::int64_t K, DType dtype, Sparse24Sm90Sizes* sizes);

// dense: [N, K] row-major, exactly 2:4 along K (at most 2 nonzeros per group of 4). Writes CUTLASS's
// compressed A and metadata (sizes above; 16-byte aligned buffers).
Status sparse24_sm90_compress(const void* dense, void* compressed, void* metadata, void* workspace, std::int64_t N,
                              std::int64_t K, DType dtype, cudaStream_t stream);

// Host-only check that CUTLASS accepts this problem as sparse24_sm90_gemm would pass it (layouts of the
// compressed A / metadata, TMA alignment of x and y); sets *ok. No device is touched.
Status sparse24_sm90_can_implement(std::int64_t M, std::int64_t N, std::int64_t K, DType dtype, bool* ok);

// Device workspace the GEMM needs for M tokens (bytes; may be 0).
Status sparse24_sm90_workspace_bytes(std::int64_t M, std::int64_t N, std::int64_t K, DType dtype, int sm_count,
                                     std::int64_t* bytes);

// x [M, K] row-major, bias [N] or null, y [M, N] row-major; all of dtype. Needs N % 8 == 0,
// K % 16 == 0 and 16-byte aligned pointers. sm_count: multiprocessors of the current device.
Status sparse24_sm90_gemm(const void* x, const void* compressed, const void* metadata, const void* bias, void* y,
                          void* workspace, std::int64_t workspace_bytes, std::int64_t M, std::int64_t N,
                          std::int64_t K, DType dtype, int sm_count, cudaStream_t stream);

}  // namespace prunekit
