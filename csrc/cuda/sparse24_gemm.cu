// 2:4 decode/skinny GEMM on mma.sp.sync.aligned.m16n8k32 (bf16/fp16 in, fp32 accumulate), sm_80+.
//
// The weight is the sparse A operand (16 output features per warp), the tokens are the n=8 side
// (M <= 64 tokens -> up to 8 n-tiles that reuse one weight fragment), and K is split over gridDim.y
// with a second pass that sums the fp32 partials, adds the bias and casts.
//
// Device layout = the logical layout (values [N, K/2], meta [N, K/8]); no re-layout pass exists.
// Instead of shuffling the weight so that each lane's fragment is one load, the kernel permutes K,
// which is free because K is reduced over: for a chunk of 64 logical inputs (16 groups: 64 bytes of
// values and 8 bytes of metadata per row) lane (g = lane/4, t = lane%4) loads ONE 16-byte word of row
// g and one of row g+8: the values of groups 4t..4t+3. The chunk is two mma steps j = 0, 1. In step j the
// mma's "slot group" s (0..7, the 4-wide K sub-chunks of its k=32) holds logical group
//     L(s, j) = 4s + 2j        for s < 4
//             = 4(s-4) + 2j + 1 for s >= 4
// so lane t's A registers are words 2j and 2j+1 of its 16-byte loads, the metadata register of lane
// t (t & 1 = p selects slot groups 4p..4p+3) gathers nibbles of groups L(4p + i, j), i = 0..3, and the
// B operand (tokens) is read at the same permuted logical K. python/prunekit/ref/sparse24_fragments.py
// is the CPU emulation of exactly this mapping (and of the instruction), tested against W·xᵀ.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "prunekit/mma_sp.h"  // PRUNEKIT_MMA_SP: the instruction form (module reports SPARSE24_MMA_SP_FORM)
#include "prunekit/sparse24_gemm.h"

namespace prunekit {
namespace {

constexpr int kWarps = kSparse24RowsPerBlock / 16;
constexpr std::uint64_t kZeroGroupsMeta = 0x4444444444444444ull;  // nibble 0x4 (positions 0,1) everywhere

// Logical group (within a 64-wide chunk) held by mma slot group s in step j.
__device__ __forceinline__ int logical_group(int s, int j) { return s < 4 ? 4 * s + 2 * j : 4 * (s - 4) + 2 * j + 1; }

__device__ __forceinline__ std::uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Metadata register of a lane with p = t & 1 in step j: bits 0-15 row g, bits 16-31 row g+8, nibble i
// for slot group 4p + i.
__device__ __forceinline__ std::uint32_t meta_register(std::uint64_t row_g, std::uint64_t row_g8, int p, int j) {
  std::uint32_t e = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int L = logical_group(4 * p + i, j);
    e |= static_cast<std::uint32_t>((row_g >> (4 * L)) & 0xF) << (4 * i);
    e |= static_cast<std::uint32_t>((row_g8 >> (4 * L)) & 0xF) << (16 + 4 * i);
  }
  return e;
}

template <bool kBF16>
__device__ __forceinline__ void mma_sp(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[4],
                                       std::uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBF16) {
    asm volatile(
        PRUNEKIT_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        PRUNEKIT_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
#endif
}

struct ChunkFragments {
  uint4 values_g, values_g8;     // groups 4t..4t+3 of rows g and g+8
  std::uint64_t meta_g, meta_g8; // the chunk's 16 nibbles of rows g and g+8
};

__device__ __forceinline__ ChunkFragments load_chunk(const uint4* values, const uint2* meta, std::int64_t row_g,
                                                     bool ok_g, bool ok_g8, std::int64_t values_stride,
                                                     std::int64_t meta_stride, int chunk, int t) {
  ChunkFragments f;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  f.values_g = ok_g ? __ldg(values + row_g * values_stride + 4 * chunk + t) : zero;
  f.values_g8 = ok_g8 ? __ldg(values + (row_g + 8) * values_stride + 4 * chunk + t) : zero;
  uint2 m = ok_g ? __ldg(meta + row_g * meta_stride + chunk) : make_uint2(0, 0);
  f.meta_g = ok_g ? (static_cast<std::uint64_t>(m.y) << 32 | m.x) : kZeroGroupsMeta;
  m = ok_g8 ? __ldg(meta + (row_g + 8) * meta_stride + chunk) : make_uint2(0, 0);
  f.meta_g8 = ok_g8 ? (static_cast<std::uint64_t>(m.y) << 32 | m.x) : kZeroGroupsMeta;
  return f;
}

// Each warp: 16 output rows x all M tokens over one split's K chunks; writes fp32 partials [split, M, N].
template <bool kBF16, int kTiles>
__global__ void __launch_bounds__(kWarps * 32)
    sparse24_decode_kernel(const std::uint16_t* __restrict__ x, const uint4* __restrict__ values,
                           const uint2* __restrict__ meta, float* __restrict__ partial, int M, int N, int K,
                           int chunks_per_split) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * 16;
  if (row0 >= N) return;  // no block-level synchronisation below, so whole warps may leave
  const int chunks = K / kSparse24ChunkK;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(chunks, c_begin + chunks_per_split);
  const std::int64_t row_g = row0 + g;
  const bool ok_g = row_g < N, ok_g8 = row_g + 8 < N;
  const std::int64_t values_stride = K / 16, meta_stride = K / 64;

  float acc[kTiles][4];
#pragma unroll
  for (int n = 0; n < kTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  ChunkFragments next;
  if (c_begin < c_end) next = load_chunk(values, meta, row_g, ok_g, ok_g8, values_stride, meta_stride, c_begin, t);
  for (int c = c_begin; c < c_end; ++c) {
    const ChunkFragments cur = next;
    if (c + 1 < c_end) next = load_chunk(values, meta, row_g, ok_g, ok_g8, values_stride, meta_stride, c + 1, t);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const std::uint32_t e = meta_register(cur.meta_g, cur.meta_g8, t & 1, j);
      const std::uint32_t a[4] = {word(cur.values_g, 2 * j), word(cur.values_g8, 2 * j),
                                  word(cur.values_g, 2 * j + 1), word(cur.values_g8, 2 * j + 1)};
#pragma unroll
      for (int n = 0; n < kTiles; ++n) {
        const int token = n * 8 + g;
        std::uint32_t b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          // B register r holds slot K 2t + 8r (+1): slot group 2r + t/2, positions 2(t&1), 2(t&1)+1.
          const int k = c * kSparse24ChunkK + 4 * logical_group(2 * r + (t >> 1), j) + 2 * (t & 1);
          b[r] = token < M
                     ? __ldg(reinterpret_cast<const std::uint32_t*>(x + static_cast<std::int64_t>(token) * K + k))
                     : 0u;
        }
        mma_sp<kBF16>(acc[n], a, b, e);
      }
    }
  }
  // D fragment: d0, d1 -> row g, tokens 2t, 2t+1; d2, d3 -> row g+8, same tokens.
  float* out = partial + static_cast<std::int64_t>(blockIdx.y) * M * N;
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int token = n * 8 + 2 * t + (i & 1);
      const std::int64_t row = row_g + (i >= 2 ? 8 : 0);
      if (token < M && row < N) out[static_cast<std::int64_t>(token) * N + row] = acc[n][i];
    }
  }
}

template <bool kBF16>
__device__ __forceinline__ std::uint16_t to_bits(float v) {
  if constexpr (kBF16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <bool kBF16>
__device__ __forceinline__ float from_bits(std::uint16_t v) {
  if constexpr (kBF16) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  } else {
    return __half2float(__ushort_as_half(v));
  }
}

template <bool kBF16>
__global__ void sparse24_reduce_kernel(const float* __restrict__ partial, const std::uint16_t* __restrict__ bias,
                                       std::uint16_t* __restrict__ y, std::int64_t MN, int N, int splits) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[s * MN + i];
  if (bias != nullptr) sum += from_bits<kBF16>(bias[i % N]);
  y[i] = to_bits<kBF16>(sum);
}

template <bool kBF16, int kTiles>
void launch_main(const void* x, const void* values, const std::uint8_t* meta, float* workspace, int M, int N, int K,
                 int splits, int chunks_per_split, cudaStream_t stream) {
  const dim3 grid((N + kSparse24RowsPerBlock - 1) / kSparse24RowsPerBlock, splits);
  sparse24_decode_kernel<kBF16, kTiles><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const std::uint16_t*>(x), static_cast<const uint4*>(values), reinterpret_cast<const uint2*>(meta),
      workspace, M, N, K, chunks_per_split);
}

template <bool kBF16>
void launch(const void* x, const void* values, const std::uint8_t* meta, const void* bias, void* y, float* workspace,
            int M, int N, int K, int splits, int chunks_per_split, cudaStream_t stream) {
  if (M <= 8) {
    launch_main<kBF16, 1>(x, values, meta, workspace, M, N, K, splits, chunks_per_split, stream);
  } else if (M <= 16) {
    launch_main<kBF16, 2>(x, values, meta, workspace, M, N, K, splits, chunks_per_split, stream);
  } else if (M <= 32) {
    launch_main<kBF16, 4>(x, values, meta, workspace, M, N, K, splits, chunks_per_split, stream);
  } else {
    launch_main<kBF16, 8>(x, values, meta, workspace, M, N, K, splits, chunks_per_split, stream);
  }
  const std::int64_t MN = static_cast<std::int64_t>(M) * N;
  const int threads = 256;
  sparse24_reduce_kernel<kBF16><<<static_cast<unsigned>((MN + threads - 1) / threads), threads, 0, stream>>>(
      workspace, static_cast<const std::uint16_t*>(bias), static_cast<std::uint16_t*>(y), MN, N, splits);
}

bool aligned(const void* p, std::uintptr_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

}  // namespace

Status sparse24_decode_gemm(const void* x, const void* values, const std::uint8_t* meta, const void* bias, void* y,
                            float* workspace, std::int64_t M, std::int64_t N, std::int64_t K, int splits,
                            int chunks_per_split, DType dtype, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return Status::kUnsupported;
  if (M < 1 || M > kSparse24MaxTokens || N < 1 || N > (1ll << 30) || K < kSparse24ChunkK ||
      K % kSparse24ChunkK != 0 || K > (1ll << 30) || splits < 1 || chunks_per_split < 1 ||
      static_cast<std::int64_t>(splits) * chunks_per_split < K / kSparse24ChunkK || splits > 65535) {
    return Status::kInvalidArgument;
  }
  if (!aligned(values, 16) || !aligned(meta, 8) || !aligned(x, 4) || !aligned(y, 2) || !aligned(workspace, 4)) {
    return Status::kInvalidArgument;
  }
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  if (dtype == DType::kBFloat16) {
    launch<true>(x, values, meta, bias, y, workspace, m, n, k, splits, chunks_per_split, stream);
  } else {
    launch<false>(x, values, meta, bias, y, workspace, m, n, k, splits, chunks_per_split, stream);
  }
  // Peek, not get: the binding reads (and clears) the error to name it in its message.
  return cudaPeekAtLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace prunekit

namespace prunekit {
const char* sparse24_mma_sp_form() { return PRUNEKIT_MMA_SP; }
}  // namespace prunekit
