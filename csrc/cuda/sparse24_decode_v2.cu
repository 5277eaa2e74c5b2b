// 2:4 decode GEMM, version 2, on mma.sp.sync.aligned.m16n8k32 (bf16/fp16 in, fp32 accumulate), sm_80+.
//
// The Sparse-Marlin pattern, written for prunekit (python/prunekit/ref/sparse24_decode_v2.py is the CPU
// emulation of every index below, tested against x·Wᵀ):
// - Device layout made once per weight: one 1152-byte block per (16-row tile, 64-wide K chunk), holding
//   each lane's A fragment for the chunk's two mma steps (one 16-byte shared load per lane per step) and
//   each lane's metadata word (one 32-bit shared load per lane per chunk). Step 0 uses sparsity selector 0
//   (lanes t = 0, 1 of each quad supply metadata) and step 1 selector 1 (t = 2, 3), so the one word a
//   lane loads is used by exactly one of the two steps and no metadata bit is loaded for nothing.
// - Weights stream global -> shared through a `kStages`-deep cp.async pipeline with an L2 evict-first
//   policy (read once); the activations' slice for the same K range rides in the same stage (evict-last:
//   every block reads them), is shared by all warps of the block, and reaches the tensor cores with one
//   ldmatrix.x4 per (n-tile, step). Activation rows M..8*kTiles-1 are zeroed once.
// - Block = kWarps warps, each owning 16 rows of a 16*kWarps-row block tile. The (block tile, k-iteration)
//   units are dealt out in equal contiguous runs to a grid of at most the blocks that fit on the GPU at
//   once ("stream-K": K is striped over all SMs, no wave tail).
// - Reduction inside the kernel, no fp32 workspace, no second launch, deterministic: the blocks sharing a
//   tile add their fp32 partials into y in a fixed order — the block with the highest index first (it
//   meets the tile at the start of its run, so its part is ready early), the lowest last — each waiting on
//   a per-tile lock (acquire/release) for its turn and reading the previous partial back from y. Partials
//   are therefore rounded to y's dtype between blocks (a tile is shared by 1-3 blocks in the shapes that
//   matter). The last block resets the lock to 0, so the lock buffer is zero after every launch.
//   A block waits only for blocks with a higher index, which are resident (the grid is capped at what fits
//   at once); a wait that still takes over ~1 s gives up and writes NaN (loud, never a hang or a silent
//   wrong number; the dispatcher's first-use check then disables the kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "prunekit/sparse24_decode_v2.h"

#include "prunekit/mma_sp.h"  // PRUNEKIT_MMA_SP: the instruction form (module reports DECODE_V2_MMA_SP_FORM)
#define PRUNEKIT_V2_MMA_SP PRUNEKIT_MMA_SP ".sync.aligned.m16n8k32.row.col.f32."

namespace prunekit {
namespace {

constexpr DecodeV2Variant kVariants[] = {{4, 4, 1}, {4, 3, 2}, {8, 4, 1}, {8, 3, 2}};
constexpr int kVariantCount = sizeof(kVariants) / sizeof(kVariants[0]);
constexpr int kValueBytes = 1024;
constexpr long long kMaxSpins = 1ll << 24;  // x >= 64 ns sleeps: about a second or more

struct Args {
  const std::uint16_t* x;
  const std::uint8_t* weight;
  const std::uint16_t* bias;
  std::uint16_t* y;
  int* locks;
  int M, N, K;
  int tiles16, chunks;  // 16-row tiles and 64-wide chunks of the layout
  int k_iters;          // k-iterations (of kChunks chunks) per block tile
  int iters;            // units per block
  int total;            // block tiles * k_iters
};

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ std::uint64_t evict_first_policy() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ std::uint64_t evict_last_policy() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, int src_bytes, std::uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes), "l"(policy)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.global.acquire.gpu.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.global.release.gpu.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

template <bool kBF16, int kSelector>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint4& a, const std::uint32_t (&b)[4], std::uint32_t e) {
  if constexpr (kBF16) {
    asm volatile(PRUNEKIT_V2_MMA_SP
                 "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(kSelector));
  } else {
    asm volatile(PRUNEKIT_V2_MMA_SP
                 "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
                   "n"(kSelector));
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
__device__ __forceinline__ std::uint16_t to_bits(float v) {
  if constexpr (kBF16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <int kWarps, int kStages, int kChunks, int kTiles>
struct Shape {
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWeightStage = kWarps * kChunks * kDecodeV2BlockBytes;
  static constexpr int kXRow = kChunks * kDecodeV2ChunkK * 2 + 16;  // +16 B: ldmatrix rows on distinct banks
  static constexpr int kXRows = 8 * kTiles;
  static constexpr int kStageBytes = kWeightStage + kXRows * kXRow;
  static constexpr int kSmem = kStages * kStageBytes;
  static_assert(kWeightStage % 16 == 0 && kXRow % 16 == 0, "16-byte shared-memory pieces");
};

template <bool kBF16, int kWarps, int kStages, int kChunks, int kTiles>
__global__ void __launch_bounds__(32 * kWarps) decode_v2_kernel(const Args a) {
  using S = Shape<kWarps, kStages, kChunks, kTiles>;
  extern __shared__ __align__(16) std::uint8_t smem[];
  __shared__ int timed_out;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int u_begin = blockIdx.x * a.iters;
  const int u_end = min(a.total, u_begin + a.iters);
  if (u_begin >= u_end) return;  // uniform over the block (the launcher sizes the grid so it never happens)

  // Activation rows M..kXRows-1 of every stage stay zero (tokens the n-tiles cover but x does not have).
  if (a.M < S::kXRows) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const int pieces = (S::kXRows - a.M) * S::kXRow / 16;
    for (int s = 0; s < kStages; ++s) {
      uint4* base = reinterpret_cast<uint4*>(smem + s * S::kStageBytes + S::kWeightStage + a.M * S::kXRow);
      for (int i = tid; i < pieces; i += S::kThreads) base[i] = zero;
    }
  }
  const std::uint64_t weight_policy = evict_first_policy(), x_policy = evict_last_policy();

  auto load_unit = [&](int u, int stage) {
    if (u >= u_end) return;
    const int tile = u / a.k_iters, kt = u - tile * a.k_iters;
    const int c0 = kt * kChunks;
    const int valid_pieces = min(kChunks, a.chunks - c0) * (kDecodeV2BlockBytes / 16);
    std::uint8_t* ws = smem + stage * S::kStageBytes;
    // Weights: each warp copies its own 16-row tile's chunks (contiguous in the layout).
    const int t16 = tile * kWarps + warp;
    if (t16 < a.tiles16) {
      const std::uint8_t* src = a.weight + (static_cast<std::int64_t>(t16) * a.chunks + c0) * kDecodeV2BlockBytes;
      const std::uint32_t dst = smem_addr(ws + warp * kChunks * kDecodeV2BlockBytes);
      constexpr int kPiecesPerWarp = kChunks * kDecodeV2BlockBytes / 16;
#pragma unroll
      for (int i = 0; i < (kPiecesPerWarp + 31) / 32; ++i) {
        const int off = lane + 32 * i;
        if (off < valid_pieces) cp_async16(dst + off * 16, src + off * 16, 16, weight_policy);
      }
    }
    std::uint8_t* xs = ws + S::kWeightStage;
    constexpr int kXPieces = kChunks * kDecodeV2ChunkK / 8;
#pragma unroll 1
    for (int p = tid; p < a.M * kXPieces; p += S::kThreads) {
      const int r = p / kXPieces, q = p - r * kXPieces;
      const int k = c0 * kDecodeV2ChunkK + q * 8;
      const bool ok = k < a.K;  // K % 8 == 0: a piece is all in or all out
      cp_async16(smem_addr(xs + r * S::kXRow + q * 16), ok ? a.x + static_cast<std::int64_t>(r) * a.K + k : a.x,
                 ok ? 16 : 0, x_policy);
    }
  };

  float acc[kTiles][4];
#pragma unroll
  for (int n = 0; n < kTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_unit(u_begin + s, s);
    cp_async_commit();
  }
  int stage = 0;
  for (int u = u_begin; u < u_end; ++u) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `stage` is in for everyone, and stage `stage - 1` is free to refill
    {
      int next = stage + kStages - 1;
      if (next >= kStages) next -= kStages;
      load_unit(u + kStages - 1, next);
      cp_async_commit();  // possibly empty: keeps the group count in step
    }
    const int tile = u / a.k_iters, kt = u - tile * a.k_iters;
    const int t16 = tile * kWarps + warp;
    if (t16 < a.tiles16) {
      const std::uint8_t* ws = smem + stage * S::kStageBytes + warp * kChunks * kDecodeV2BlockBytes;
      const std::uint8_t* xs = smem + stage * S::kStageBytes + S::kWeightStage;
      const int nc = min(kChunks, a.chunks - kt * kChunks);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (c < nc) {
          const std::uint8_t* blk = ws + c * kDecodeV2BlockBytes;
          const std::uint32_t e = *reinterpret_cast<const std::uint32_t*>(blk + kValueBytes + lane * 4);
          const uint4 a0 = *reinterpret_cast<const uint4*>(blk + lane * 16);
          const uint4 a1 = *reinterpret_cast<const uint4*>(blk + 512 + lane * 16);
#pragma unroll
          for (int n = 0; n < kTiles; ++n) {
            // ldmatrix.x4: lanes 8r..8r+7 address rows (tokens) 8n..8n+7 of matrix r = K 8r..8r+7 of the step
            const std::uint8_t* row =
                xs + (8 * n + (lane & 7)) * S::kXRow + (c * kDecodeV2ChunkK + 8 * (lane >> 3)) * 2;
            std::uint32_t b[4];
            ldmatrix_x4(b, smem_addr(row));
            mma_sp<kBF16, 0>(acc[n], a0, b, e);
            ldmatrix_x4(b, smem_addr(row + 64));  // step 1: K + 32
            mma_sp<kBF16, 1>(acc[n], a1, b, e);
          }
        }
      }
    }
    if (++stage == kStages) stage = 0;

    if (kt == a.k_iters - 1 || u == u_end - 1) {  // end of this block's part of the tile: reduce into y
      const int first = (tile * a.k_iters) / a.iters;
      const int last = ((tile + 1) * a.k_iters - 1) / a.iters;
      const int order = last - static_cast<int>(blockIdx.x), count = last - first + 1;
      bool poisoned = false;
      if (order > 0) {
        if (tid == 0) {
          long long spins = 0;
          while (ld_acquire(a.locks + tile) != order && ++spins < kMaxSpins) __nanosleep(64);
          timed_out = spins >= kMaxSpins;
        }
        __syncthreads();
        poisoned = timed_out != 0;
      }
      if (t16 < a.tiles16) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int n = 0; n < kTiles; ++n) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = t16 * kDecodeV2TileN + g + 8 * (i >> 1);
            const int token = 8 * n + 2 * t + (i & 1);
            if (row < a.N && token < a.M) {
              const std::int64_t at = static_cast<std::int64_t>(token) * a.N + row;
              float v = acc[n][i];
              if (order == 0) {
                if (a.bias != nullptr) v += from_bits<kBF16>(a.bias[row]);
              } else {
                v += from_bits<kBF16>(__ldcg(a.y + at));  // L2: written by another block
              }
              a.y[at] = to_bits<kBF16>(poisoned ? __int_as_float(0x7fc00000) : v);
            }
            acc[n][i] = 0.f;
          }
        }
      }
      if (count > 1) {
        __threadfence();
        __syncthreads();
        if (tid == 0) st_release(a.locks + tile, order == count - 1 ? 0 : order + 1);
      }
    }
  }
  cp_async_wait<0>();
}

// ---------------- host side ----------------

constexpr int kMaxDevices = 64;
constexpr int kTileVariants = 4;  // kTiles = 1, 2, 4, 8
std::atomic<int> g_capacity[kMaxDevices][kVariantCount][kTileVariants][2];  // blocks that fit + 1; 0 = unknown

int tiles_index(int tiles) { return tiles == 1 ? 0 : tiles == 2 ? 1 : tiles == 4 ? 2 : 3; }

int tiles_for(std::int64_t M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

template <bool kBF16, int kWarps, int kStages, int kChunks, int kTiles>
struct Instance {
  using S = Shape<kWarps, kStages, kChunks, kTiles>;
  static constexpr void (*kernel)(const Args) = decode_v2_kernel<kBF16, kWarps, kStages, kChunks, kTiles>;

  // Blocks resident at once on the current device (raises the dynamic shared-memory limit first).
  static Status capacity(int variant, int* out) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return Status::kCudaError;
    std::atomic<int>* slot =
        device < kMaxDevices ? &g_capacity[device][variant][tiles_index(kTiles)][kBF16 ? 1 : 0] : nullptr;
    if (slot != nullptr) {
      const int known = slot->load(std::memory_order_relaxed);
      if (known > 0) {
        *out = known - 1;
        return Status::kOk;
      }
    }
    int sms = 0, per_sm = 0, smem_limit = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      return Status::kCudaError;
    }
    if (S::kSmem > smem_limit) {
      *out = 0;  // this variant's pipeline does not fit this GPU's shared memory (e.g. sm_86/sm_89: 99 KB)
    } else {
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmem) != cudaSuccess ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, S::kThreads, S::kSmem) != cudaSuccess) {
        return Status::kCudaError;
      }
      *out = sms * per_sm;
    }
    if (slot != nullptr) slot->store(*out + 1, std::memory_order_relaxed);
    return Status::kOk;
  }

  static Status launch(DecodeV2Params& p, int variant) {
    int cap = 0;
    Status s = capacity(variant, &cap);
    if (s != Status::kOk) return s;
    if (cap < 1) return Status::kUnsupported;  // does not fit on this device (shared memory): another variant will
    Args a{};
    a.x = static_cast<const std::uint16_t*>(p.x);
    a.weight = p.weight;
    a.bias = static_cast<const std::uint16_t*>(p.bias);
    a.y = static_cast<std::uint16_t*>(p.y);
    a.locks = p.locks;
    a.M = static_cast<int>(p.M);
    a.N = static_cast<int>(p.N);
    a.K = static_cast<int>(p.K);
    a.tiles16 = static_cast<int>((p.N + kDecodeV2TileN - 1) / kDecodeV2TileN);
    a.chunks = static_cast<int>((p.K + kDecodeV2ChunkK - 1) / kDecodeV2ChunkK);
    const int block_tiles = (a.tiles16 + kWarps - 1) / kWarps;
    a.k_iters = (a.chunks + kChunks - 1) / kChunks;
    const std::int64_t total = static_cast<std::int64_t>(block_tiles) * a.k_iters;
    if (total > (1ll << 30)) return Status::kInvalidArgument;
    a.total = static_cast<int>(total);
    const int requested = p.blocks > 0 ? (p.blocks < cap ? p.blocks : cap) : cap;
    a.iters = static_cast<int>((total + requested - 1) / requested);
    const int grid = static_cast<int>((total + a.iters - 1) / a.iters);
    kernel<<<grid, S::kThreads, S::kSmem, p.stream>>>(a);
    p.launched_blocks = grid;
    return Status::kOk;
  }
};

template <bool kBF16, int kWarps, int kStages, int kChunks>
Status by_tiles(DecodeV2Params& p, int variant, int* capacity_out) {
  switch (tiles_for(p.M)) {
#define PRUNEKIT_V2_TILES(T)                                                                  \
  case T:                                                                                     \
    return capacity_out ? Instance<kBF16, kWarps, kStages, kChunks, T>::capacity(variant, capacity_out) \
                        : Instance<kBF16, kWarps, kStages, kChunks, T>::launch(p, variant);
    PRUNEKIT_V2_TILES(1)
#ifndef PRUNEKIT_DECODE_V2_ONE_INSTANCE  // tests that read the PTX compile one kernel per dtype
    PRUNEKIT_V2_TILES(2)
    PRUNEKIT_V2_TILES(4)
    PRUNEKIT_V2_TILES(8)
#endif
#undef PRUNEKIT_V2_TILES
  }
  return Status::kInvalidArgument;
}

template <bool kBF16>
Status by_variant(DecodeV2Params& p, int* capacity_out) {
  switch (p.variant) {  // the order of kVariants
    case 0: return by_tiles<kBF16, 4, 4, 1>(p, 0, capacity_out);
#ifndef PRUNEKIT_DECODE_V2_ONE_INSTANCE
    case 1: return by_tiles<kBF16, 4, 3, 2>(p, 1, capacity_out);
    case 2: return by_tiles<kBF16, 8, 4, 1>(p, 2, capacity_out);
    case 3: return by_tiles<kBF16, 8, 3, 2>(p, 3, capacity_out);
#endif
  }
  return Status::kInvalidArgument;
}
static_assert(kVariantCount == 4, "by_variant lists every variant");

Status dispatch(DecodeV2Params& p, int* capacity_out) {
  if (p.dtype == DType::kBFloat16) return by_variant<true>(p, capacity_out);
  if (p.dtype == DType::kFloat16) return by_variant<false>(p, capacity_out);
  return Status::kUnsupported;
}

bool aligned(const void* ptr, std::uintptr_t bytes) { return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0; }

}  // namespace

int sparse24_decode_v2_variant_count() { return kVariantCount; }

const char* sparse24_decode_v2_mma_sp_form() { return PRUNEKIT_MMA_SP; }

Status sparse24_decode_v2_variant(int index, DecodeV2Variant* out) {
  if (index < 0 || index >= kVariantCount || out == nullptr) return Status::kInvalidArgument;
  *out = kVariants[index];
  return Status::kOk;
}

std::int64_t sparse24_decode_v2_lock_count(std::int64_t N, int variant) {
  if (variant < 0 || variant >= kVariantCount || N < 1) return 0;
  const std::int64_t tiles16 = (N + kDecodeV2TileN - 1) / kDecodeV2TileN;
  return (tiles16 + kVariants[variant].warps - 1) / kVariants[variant].warps;
}

Status sparse24_decode_v2_max_blocks(int variant, std::int64_t M, DType dtype, int* out) {
  if (out == nullptr || variant < 0 || variant >= kVariantCount || M < 1 || M > kDecodeV2MaxTokens) {
    return Status::kInvalidArgument;
  }
  DecodeV2Params p;
  p.M = M;
  p.dtype = dtype;
  p.variant = variant;
  const Status s = dispatch(p, out);
  return s == Status::kCudaError || cudaPeekAtLastError() == cudaSuccess ? s : Status::kCudaError;
}

Status sparse24_decode_v2(DecodeV2Params& p) {
  p.launched_blocks = 0;
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return Status::kUnsupported;
  if (p.variant < 0 || p.variant >= kVariantCount || p.M < 1 || p.M > kDecodeV2MaxTokens || p.N < 1 ||
      p.N > (1ll << 24) || p.K < 8 || p.K % 8 != 0 || p.K > (1ll << 24)) {
    return Status::kInvalidArgument;
  }
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr || p.locks == nullptr || !aligned(p.x, 16) ||
      !aligned(p.weight, 16) || !aligned(p.y, 2) || !aligned(p.locks, 4) || (p.bias && !aligned(p.bias, 2))) {
    return Status::kInvalidArgument;
  }
  const Status s = dispatch(p, nullptr);
  if (s != Status::kOk) return s;
  // Peek, not get: the binding reads (and clears) the error to name it in its message.
  return cudaPeekAtLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace prunekit
