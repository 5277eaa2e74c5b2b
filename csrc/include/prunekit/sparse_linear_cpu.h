// Sparse linear layers on the CPU: y[M, N] = x[M, K] · W[N, K]ᵀ + bias, W compressed, fp32 accumulation.
// Two weight formats, both read in their saved logical layout (no extra device copy):
//   2:4      values [N, K/2] + meta uint8 [N, K/8]   (DESIGN.md §5; nibble idx0 | idx1 << 2 per group of 4)
//   bitmask  values [nnz (+16 padding)] + mask uint8 [N, K/8] (bit j of byte b = input 8b + j is kept)
//            + row_offsets int64 [N + 1] (first value of each row), for unstructured high sparsity.
// x, W, bias and y share one dtype (float32, bfloat16 or float16); products and sums are fp32.
// ISA: chosen at run time (AVX-512 with BF16 + VBMI2, AVX-512F, AVX2+FMA+F16C, portable scalar); each path is compiled in its own
// file with its own flags so the library runs on CPUs without AVX-512. Threads: OpenMP over output rows.
#pragma once
#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

// kAvx512Bf16: AVX-512F/BW/VL plus AVX512-BF16 and AVX512-VBMI2 (Zen 4, Sapphire Rapids and later).
enum class CpuIsa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4 };

enum class CpuSparseFormat : int { k24 = 0, kBitmask = 1 };

struct CpuSparseLinearParams {
  const void* x = nullptr;                // [M, K], row stride K
  const void* values = nullptr;           // 2:4: [N, K/2]; bitmask: [nnz] (readable 16 elements past the end)
  const std::uint8_t* meta = nullptr;     // 2:4 meta or bitmask mask: [N, K/8]
  const std::int64_t* row_offsets = nullptr;  // bitmask only: [N + 1]
  const void* bias = nullptr;             // [N] or null
  void* y = nullptr;                      // [M, N], row stride N
  std::int64_t M = 0, N = 0, K = 0;
  DType dtype = DType::kFloat32;
  CpuSparseFormat format = CpuSparseFormat::k24;
  CpuIsa isa = CpuIsa::kAuto;
  int threads = 1;
};

// The best path this CPU runs (kAvx512Bf16, kAvx512, kAvx2 or kScalar).
CpuIsa cpu_best_isa();
// Whether this CPU can run `isa` (kAuto: always).
bool cpu_isa_supported(CpuIsa isa);

// Writes back and evicts the cache lines of [p, p + bytes) from every cache level (x86 clflush), so that the
// next read comes from memory while everything else stays cached: how the route times a layer whose weights, in
// a whole model, are read from memory. Returns false where the CPU has no such instruction (nothing done).
bool flush_cache_lines(const void* p, std::int64_t bytes);

// kInvalidArgument for bad sizes (K % 8 != 0, negative sizes, null pointers), kUnsupported for a dtype
// other than float32/bfloat16/float16 or an ISA this CPU cannot run.
Status sparse_linear_cpu(const CpuSparseLinearParams& p);

// ---- per-ISA entry points (csrc/cpu/isa/*.cpp). x is fp32: M == 1 -> xf [K]; M > 1 -> xT [K, ld] (tokens
// contiguous, ld >= M a multiple of the vector width, padding zero). Output fp32: M == 1 -> yf [N];
// M > 1 -> yT [N, ld]. Values/meta as in the params. ----
struct CpuKernelArgs {
  const float* x = nullptr;
  const void* x_raw = nullptr;  // x [M, K] as the caller gave it (kernels that read it themselves)
  void* work = nullptr;          // scratch (s24_rows_bf16: 64 * M * ceil(K / 32) bytes, 64-byte aligned)
  float* y = nullptr;
  void* y_raw = nullptr;         // y [M, N] in the caller's dtype (kernels that finish the output themselves)
  const void* bias = nullptr;    // bias [N] in the caller's dtype, or null (those kernels add it)
  const void* values = nullptr;
  const std::uint8_t* meta = nullptr;
  const std::int64_t* row_offsets = nullptr;
  std::int64_t M = 0, N = 0, K = 0, ld = 0;
  DType dtype = DType::kFloat32;
  int threads = 1;
};

namespace scalar {
void s24_gemv(const CpuKernelArgs& a);
void s24_gemm(const CpuKernelArgs& a);
void bm_gemv(const CpuKernelArgs& a);
void bm_gemm(const CpuKernelArgs& a);
}  // namespace scalar
namespace avx2 {
void s24_gemv(const CpuKernelArgs& a);
void s24_gemm(const CpuKernelArgs& a);
void bm_gemv(const CpuKernelArgs& a);
void bm_gemm(const CpuKernelArgs& a);
}  // namespace avx2
namespace avx512 {
void s24_gemv(const CpuKernelArgs& a);
void s24_gemm(const CpuKernelArgs& a);
// 2:4, 2 <= M <= 16 (used up to M = 4): x fp32 [M, K] row-major, y fp32 [M, N] (weights read once for all tokens).
void s24_few(const CpuKernelArgs& a);
void bm_gemv(const CpuKernelArgs& a);
void bm_gemm(const CpuKernelArgs& a);
}  // namespace avx512
namespace avx512bf16 {
void s24_gemv(const CpuKernelArgs& a);
void s24_gemm(const CpuKernelArgs& a);
void s24_few(const CpuKernelArgs& a);
void bm_gemv(const CpuKernelArgs& a);
void bm_gemm(const CpuKernelArgs& a);
// bf16 weights, M >= 2 (and M = 1 on long rows), lanes = 8 output rows x 2 groups
// (csrc/cpu/isa/avx512bf16_rows.inc): reads x_raw, writes y_raw (bf16 [M, N]) + bias itself.
void s24_rows_bf16(const CpuKernelArgs& a);
// bitmask, 2 <= M <= 16 (bf16: 1 <= M): x fp32 [M, K] row-major (bf16: x_raw), y fp32 [M, N]
// (csrc/cpu/isa/bitmask_few.inc).
void bm_few(const CpuKernelArgs& a);
}  // namespace avx512bf16

// Token width (floats) of the xT/yT layout each path wants (ld is M rounded up to it).
int cpu_isa_token_width(CpuIsa isa);

}  // namespace prunekit
