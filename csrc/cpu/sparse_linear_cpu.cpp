// Sparse linear on the CPU: validation, ISA choice, x conversion/transposition, the per-ISA kernel
// (csrc/cpu/isa/), then bias and the output conversion. Compiled for the baseline target: nothing here
// uses instructions the CPU may lack.
#include "prunekit/sparse_linear_cpu.h"

#include <cstdlib>
#include <cstring>
#include <memory>

#include "isa/common.h"

namespace prunekit {
namespace {

std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Round to nearest even, like torch's .to(torch.float16).
std::uint16_t float_to_half(float f) {
  std::uint32_t u = float_to_bits(f);
  std::uint32_t sign = (u >> 16) & 0x8000u;
  std::uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // subnormal half (or zero): value * 2^24 rounded to an integer
    float v = bits_to_float(a) * 16777216.0f;  // exact scaling; nearbyint via the fp unit's RNE
    v = v + 12582912.0f - 12582912.0f;  // 1.5 * 2^23 trick: rounds to integer (ties even)
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(v));
  }
  std::uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xC8000FFFu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<std::uint16_t>(sign | (a >> 13));
}

std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

float load_as_float(const void* p, std::int64_t i, DType dt) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return bits_to_float(static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(p)[i]) << 16);
    default: return half_to_float(static_cast<const std::uint16_t*>(p)[i]);
  }
}

void store_from_float(void* p, std::int64_t i, DType dt, float v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kBFloat16: static_cast<std::uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<std::uint16_t*>(p)[i] = float_to_half(v); break;
  }
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, FreeDeleter>;

Buffer alloc_floats(std::int64_t n) {
  std::size_t bytes = static_cast<std::size_t>((n > 0 ? n : 1) * 4);
  bytes = (bytes + 63) / 64 * 64;
  return Buffer(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// x [M, K] (dtype dt) -> fp32 tiles: tile i (tokens [i*tile, i*tile + w), w <= tile) is a contiguous [K, w]
// block at xt + i*tile*K (a K block of one tile then sits in L1 without set conflicts); padding tokens are 0.
void transpose_x(const void* x, DType dt, std::int64_t M, std::int64_t K, std::int64_t ld, std::int64_t tile,
                 int threads, float* xt) {
  constexpr std::int64_t kTile = 64;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t k0 = 0; k0 < K; k0 += kTile) {
    const std::int64_t k1 = k0 + kTile < K ? k0 + kTile : K;
    for (std::int64_t t0 = 0; t0 < ld; t0 += tile) {
      const std::int64_t w = ld - t0 < tile ? ld - t0 : tile;
      float* block = xt + t0 * K;
      for (std::int64_t m = t0; m < t0 + w; ++m)
        for (std::int64_t k = k0; k < k1; ++k) block[k * w + (m - t0)] = m < M ? load_as_float(x, m * K + k, dt) : 0.f;
    }
  }
}

using Kernel = void (*)(const CpuKernelArgs&);

struct IsaKernels {
  Kernel s24_gemv, s24_gemm, bm_gemv, bm_gemm;
  Kernel s24_few = nullptr;        // 2:4, 2 <= M <= kFewMax, row-major x and y
  Kernel s24_rows_bf16 = nullptr;  // 2:4, bf16, M >= 2 (and M = 1 at K >= kRowsM1MinK): x_raw in, y_raw out + bias
  Kernel bm_few = nullptr;         // bitmask, 2 <= M <= bm_few_max, row-major x and y (bf16: reads x_raw)
};

// Measured (1 thread, 4096x4096): the few-token kernel beat the tile kernels at M = 2 and 4, lost from M = 8.
constexpr std::int64_t kFewMax = 4;
// The bitmask few-token kernel (bitmask_few.inc) vs the M > 1 kernel (1 thread, 4096x4096, 80% and 90%): bf16
// (vdpbf16ps form) won up to M = 8, fp32 up to M = 4 (tied there).
std::int64_t bm_few_max(DType dt) { return dt == DType::kBFloat16 ? 8 : 4; }
// bf16 at M = 1: the row-panel kernel beat the gemv kernel from K = 4096 (measured, 1 thread, weights from
// memory: 4096x4096 2.0-2.3x vs 1.3-1.4x dense, 11008x4096 2.2x vs 1.5x, 4096x11008 3.0x vs 2.5x, 2048x5632
// 2.6x vs 1.5x) and lost or tied at K <= 2048 (384x1536 1.6x vs 2.5x, 2048x2048 1.8x vs 2.0x).
constexpr std::int64_t kRowsM1MinK = 4096;

IsaKernels kernels_for(CpuIsa isa) {
  switch (isa) {
#ifdef PRUNEKIT_CPU_X86_ISA
    case CpuIsa::kAvx512Bf16:
      return {avx512bf16::s24_gemv, avx512bf16::s24_gemm, avx512bf16::bm_gemv, avx512bf16::bm_gemm,
              avx512bf16::s24_few, avx512bf16::s24_rows_bf16, avx512bf16::bm_few};
    case CpuIsa::kAvx512:
      return {avx512::s24_gemv, avx512::s24_gemm, avx512::bm_gemv, avx512::bm_gemm, avx512::s24_few};
    case CpuIsa::kAvx2: return {avx2::s24_gemv, avx2::s24_gemm, avx2::bm_gemv, avx2::bm_gemm};
#endif
    default: return {scalar::s24_gemv, scalar::s24_gemm, scalar::bm_gemv, scalar::bm_gemm};
  }
}

}  // namespace

bool cpu_isa_supported(CpuIsa isa) {
#ifdef PRUNEKIT_CPU_X86_ISA
  __builtin_cpu_init();
  switch (isa) {
    case CpuIsa::kAuto:
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512Bf16:
      return cpu_isa_supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16") &&
             __builtin_cpu_supports("avx512vbmi2");
  }
  return false;
#else
  return isa == CpuIsa::kAuto || isa == CpuIsa::kScalar;
#endif
}

CpuIsa cpu_best_isa() {
  if (cpu_isa_supported(CpuIsa::kAvx512Bf16)) return CpuIsa::kAvx512Bf16;
  if (cpu_isa_supported(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_isa_supported(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

int cpu_isa_token_width(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512: return 16;
    case CpuIsa::kAvx2: return 8;
    default: return 1;
  }
}

Status sparse_linear_cpu(const CpuSparseLinearParams& p) {
  const std::int64_t M = p.M, N = p.N, K = p.K;
  if (M < 0 || N < 0 || K < 0 || K % 8 != 0) return Status::kInvalidArgument;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return Status::kUnsupported;
  if (p.format != CpuSparseFormat::k24 && p.format != CpuSparseFormat::kBitmask) return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (p.x == nullptr || p.y == nullptr || p.values == nullptr || p.meta == nullptr) return Status::kInvalidArgument;
  if (p.format == CpuSparseFormat::kBitmask && p.row_offsets == nullptr) return Status::kInvalidArgument;
  const CpuIsa isa = p.isa == CpuIsa::kAuto ? cpu_best_isa() : p.isa;
  if (!cpu_isa_supported(isa)) return Status::kUnsupported;
  const IsaKernels kern = kernels_for(isa);
  // No more threads than there is work for (~128K multiply-adds each): a small layer runs on one thread.
  const double macs = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) / 2.0;
  const int useful = static_cast<int>(macs / 131072.0) + 1;
  const int threads = p.threads < 1 ? 1 : (p.threads < useful ? p.threads : useful);
  const DType dt = p.dtype;
  const bool bm = p.format == CpuSparseFormat::kBitmask;

  CpuKernelArgs a;
  a.values = p.values;
  a.meta = p.meta;
  a.row_offsets = p.row_offsets;
  a.M = M;
  a.N = N;
  a.K = K;
  a.dtype = dt;
  a.threads = threads;

  // 2:4, bf16, M >= 2 (M == 1: K >= kRowsM1MinK) where the ISA has the vdpbf16ps kernel: it reads x and
  // writes y (and the bias) itself.
  if (!bm && dt == DType::kBFloat16 && kern.s24_rows_bf16 != nullptr && (M >= 2 || K >= kRowsM1MinK)) {
    Buffer work = alloc_floats(16 * M * ((K + 31) / 32));
    if (!work) return Status::kInvalidArgument;
    a.work = work.get();
    a.x_raw = p.x;
    a.y_raw = p.y;
    a.bias = p.bias;
    kern.s24_rows_bf16(a);
    return Status::kOk;
  }

  // M == 1, and 2 <= M <= kFewMax (2:4) / bm_few_max (bitmask) where the ISA has a few-token kernel: x and y
  // stay row-major ([M, K] and [M, N], fp32), the weights are read once for all tokens.
  // bitmask bf16 takes the few-token kernel at M == 1 too (its vpermt2w + vdpbf16ps form; 1 thread vs dense,
  // 4096x4096 / 4096x11008: 70% 2.31x -> 3.68x / 2.13x -> 2.45x, 80% 3.39x -> 3.88x / 2.98x -> 3.16x, 90% equal).
  const bool few = bm ? M <= bm_few_max(dt) && kern.bm_few != nullptr && (M >= 2 || dt == DType::kBFloat16)
                      : M >= 2 && M <= kFewMax && kern.s24_few != nullptr;
  if (M == 1 || few) {
    Buffer xbuf, ybuf;
    if (dt == DType::kFloat32) {
      a.x = static_cast<const float*>(p.x);
      a.y = static_cast<float*>(p.y);
    } else {
      const bool raw = few && bm && dt == DType::kBFloat16;  // that kernel reads the bf16 x itself
      xbuf = alloc_floats(raw ? 0 : M * K);
      ybuf = alloc_floats(M * N);
      if (!xbuf || !ybuf) return Status::kInvalidArgument;
      if (!raw)
        for (std::int64_t i = 0; i < M * K; ++i) xbuf.get()[i] = load_as_float(p.x, i, dt);
      a.x = xbuf.get();
      a.y = ybuf.get();
    }
    a.ld = 1;
    a.x_raw = p.x;
    (few ? (bm ? kern.bm_few : kern.s24_few) : (bm ? kern.bm_gemv : kern.s24_gemv))(a);
    if (dt != DType::kFloat32 || p.bias != nullptr) {
      for (std::int64_t m = 0; m < M; ++m)
        for (std::int64_t n = 0; n < N; ++n) {
          float v = a.y[m * N + n];
          if (p.bias != nullptr) v += load_as_float(p.bias, n, dt);
          store_from_float(p.y, m * N + n, dt, v);
        }
    }
    return Status::kOk;
  }

  // M > 1: x transposed to tokens-contiguous fp32 tiles (transpose_x); yT [N, ld].
  const int width = cpu_isa_token_width(isa);
  const std::int64_t ld = (M + width - 1) / width * width;
  const std::int64_t tile = width == 1 ? ld : 4 * width;
  Buffer xT = alloc_floats(K * ld), yT = alloc_floats(N * ld);
  if (!xT || !yT) return Status::kInvalidArgument;
  transpose_x(p.x, dt, M, K, ld, tile, threads, xT.get());
  a.x = xT.get();
  a.ld = ld;
  a.y = yT.get();
  (bm ? kern.bm_gemm : kern.s24_gemm)(a);
  const float* yt = yT.get();
  constexpr std::int64_t kTile = 64;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t n0 = 0; n0 < N; n0 += kTile) {
    const std::int64_t n1 = n0 + kTile < N ? n0 + kTile : N;
    for (std::int64_t m = 0; m < M; ++m)
      for (std::int64_t n = n0; n < n1; ++n) {
        float v = yt[n * ld + m];
        if (p.bias != nullptr) v += load_as_float(p.bias, n, dt);
        store_from_float(p.y, m * N + n, dt, v);
      }
  }
  return Status::kOk;
}

}  // namespace prunekit
