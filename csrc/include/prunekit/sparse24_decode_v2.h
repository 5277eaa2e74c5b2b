// 2:4 decode GEMM, version 2 (sm_80+; csrc/cuda/sparse24_decode_v2.cu): y[M, N] = x[M, K] · W[N, K]ᵀ + bias
// for M = 1..64 tokens, W in the v2 device layout built once per weight from the logical 2:4 format
// (python/prunekit/ref/sparse24_decode_v2.py: uint8 [ceil(N/16), ceil(K/64), 1152]).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

constexpr int kDecodeV2MaxTokens = 64;
constexpr int kDecodeV2TileN = 16;
constexpr int kDecodeV2ChunkK = 64;
constexpr int kDecodeV2BlockBytes = 1152;  // one (16-row tile, 64-wide K chunk): 1024 B values + 128 B metadata

// One compiled variant: warps per block (each owns 16 rows of the block tile), cp.async pipeline stages,
// 64-wide K chunks per stage.
struct DecodeV2Variant {
  int warps;
  int stages;
  int chunks_per_stage;
};

int sparse24_decode_v2_variant_count();
// "mma.sp::ordered_metadata" (CUDA >= 12.5) or "mma.sp": the instruction form this build emits.
const char* sparse24_decode_v2_mma_sp_form();
// kInvalidArgument for an index out of range.
Status sparse24_decode_v2_variant(int index, DecodeV2Variant* out);

struct DecodeV2Params {
  const void* x = nullptr;             // [M, K] bf16/fp16, row-major, 16-byte aligned
  const std::uint8_t* weight = nullptr;  // v2 device layout, 16-byte aligned
  const void* bias = nullptr;          // [N] or null
  void* y = nullptr;                   // [M, N], row-major
  int* locks = nullptr;                // >= sparse24_decode_v2_lock_count(N, variant) ints, zero before the
                                       // first launch; every launch leaves them zero. One buffer per stream:
                                       // two launches that run at once must not share it.
  std::int64_t M = 0, N = 0, K = 0;    // K % 8 == 0
  DType dtype = DType::kBFloat16;
  int variant = 0;
  int blocks = 0;                      // requested grid (<= 0: all that fit at once); capped at what fits
  cudaStream_t stream = nullptr;
  int launched_blocks = 0;             // out: the grid actually launched
};

// Block tiles (= lock entries) for N rows with this variant; 0 for a bad variant.
std::int64_t sparse24_decode_v2_lock_count(std::int64_t N, int variant);

// Blocks of this variant that are resident at once on the current device for M tokens (the grid cap).
Status sparse24_decode_v2_max_blocks(int variant, std::int64_t M, DType dtype, int* out);

// Launches the kernel on p.stream (current device). On kCudaError the error is left pending: read (and
// clear) it with cudaGetLastError().
Status sparse24_decode_v2(DecodeV2Params& p);

}  // namespace prunekit
