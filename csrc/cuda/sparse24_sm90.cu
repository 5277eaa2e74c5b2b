// 2:4 prefill GEMM on Hopper: CUTLASS 3.x sm90 structured-sparse GEMM (wgmma.sp, TMA, warp-specialized
// cooperative persistent kernel), bf16/fp16 in, fp32 accumulate, optional bias, output in x's dtype.
//
// GEMM roles (CUTLASS names in brackets): we compute yᵀ = W · xᵀ.
//   A [M_g = N, K]  = W, row-major (K-major), the 2:4 sparse operand (rows = output features);
//   B [N_g = M, K]  = x, "column-major" B = x row-major [M, K] (K-major);
//   D [M_g, N_g]    = yᵀ column-major with leading dimension N, i.e. y row-major [M, N] in memory.
// Per-row bias of D (LinCombPerRowBias) is a per-output-feature bias; a null bias pointer reads as 0.
//
// A must be in CUTLASS's sm90 compressed layout with its own metadata (64 x 128 atoms, not the
// logical format of DESIGN.md §5 and not the sm80 layout). sparse24_sm90_compress produces both from a
// dense 2:4 [N, K] with CUTLASS's compressor kernel; the Python dispatcher caches them per weight.
//
// One instantiation per dtype, tile 128x128x128, cluster 1x1x1 (build time on 2 CI cores matters).
// The sm90 mainloop/epilogue device code exists only in the sm_90a device pass: CUTLASS's kernel
// guards it with __CUDA_ARCH_FEAT_SM90_ALL and the sm_80 pass compiles an empty kernel. Host code is
// always compiled. Without CUDA >= 12.2 (CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED) every entry point
// returns kUnsupported and sparse24_sm90_compiled() says false.

// Device asserts inside CUTLASS's mainloop make ptxas serialize the wgmma pipeline (warning C7510):
// keep them out even in a Debug build of the rest of the project.
#ifndef NDEBUG
#define NDEBUG 1
#endif

#include "prunekit/sparse24_sm90.h"

#include "cutlass/arch/config.h"
#include "cutlass/cutlass.h"

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace prunekit {

bool sparse24_sm90_compiled() {
#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
  return true;
#else
  return false;
#endif
}

namespace {

bool shape_supported(std::int64_t M, std::int64_t N, std::int64_t K) {
  // K % 16: the compressed A row (K/2 halves) must be 16-byte aligned for TMA; N % 8: y's rows (D's
  // leading dimension) likewise. CUTLASS's problem extents are int32.
  constexpr std::int64_t kMax = (std::int64_t(1) << 31) - 1;
  return M >= 0 && N > 0 && K > 0 && K % 16 == 0 && N % 8 == 0 && M <= kMax && N <= kMax && K <= kMax;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

namespace {
using namespace cute;

template <class Element>
struct Sm90Sparse24 {
  using ElementA = Element;
  using LayoutTagA = cutlass::layout::RowMajor;
  static constexpr int AlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;
  using ElementB = Element;
  using LayoutTagB = cutlass::layout::ColumnMajor;
  static constexpr int AlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;
  using ElementD = Element;
  using LayoutTagD = cutlass::layout::ColumnMajor;
  static constexpr int AlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using ElementC = void;  // no source tensor: D = acc + bias
  using ElementAccumulator = float;
  using ElementCompute = float;

  using ArchTag = cutlass::arch::Sm90;
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using ProblemShape = Shape<int, int, int, int>;

  using FusionOp = cutlass::epilogue::fusion::LinCombPerRowBias<ElementD, ElementCompute, Element, ElementD,
                                                                ElementCompute>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute, ElementC, LayoutTagD,
      AlignmentD, ElementD, LayoutTagD, AlignmentD, EpilogueSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, cutlass::arch::OpClassSparseTensorOp, ElementA, LayoutTagA, AlignmentA, ElementB, LayoutTagB,
      AlignmentB, ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using ElementE = typename CollectiveMainloop::ElementE;
  using StrideA = cutlass::gemm::TagToStrideA_t<LayoutTagA>;  // dense A, for the compressor
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;

  using CompressorUtility =
      cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, ElementA, LayoutTagA, SparseConfig>;
  using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, ElementA, LayoutTagA,
                                                                                  SparseConfig, ArchTag>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;

  // GEMM problem (M_g, N_g, K, L) = (out features, tokens, in features, 1).
  static ProblemShape problem(std::int64_t M, std::int64_t N, std::int64_t K) {
    return ProblemShape{static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), 1};
  }

  static typename Compressor::Arguments compressor_arguments(const void* dense, void* compressed, void* metadata,
                                                             std::int64_t N, std::int64_t K) {
    const ProblemShape shape = problem(1, N, K);
    const StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(int(N), int(K), 1));
    typename Compressor::Arguments args{};
    args.problem_shape = shape;
    args.transform.ptr_A = dense;
    args.transform.dA = stride_a;
    args.transform.ptr_ACompress = compressed;
    args.transform.ptr_E = metadata;
    return args;  // hw_info is unused by the compressor
  }

  static Sparse24Sm90Sizes sizes(std::int64_t N, std::int64_t K) {
    const ProblemShape shape = problem(1, N, K);
    const StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(int(N), int(K), 1));
    CompressorUtility utility(shape, stride_a);
    Sparse24Sm90Sizes s;
    s.compressed_bytes = static_cast<std::int64_t>(utility.get_compressed_tensor_A_bytes());
    s.metadata_bytes = static_cast<std::int64_t>(utility.get_tensor_E_bytes());
    s.compress_workspace_bytes = static_cast<std::int64_t>(
        Compressor::get_workspace_size(compressor_arguments(nullptr, nullptr, nullptr, N, K)));
    return s;
  }

  static Status compress(const void* dense, void* compressed, void* metadata, void* workspace, std::int64_t N,
                         std::int64_t K, cudaStream_t stream) {
    auto args = compressor_arguments(dense, compressed, metadata, N, K);
    Compressor op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return Status::kInvalidArgument;
    if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return Status::kCudaError;
    if (op.run(stream) != cutlass::Status::kSuccess) return Status::kCudaError;
    return Status::kOk;
  }

  static typename Gemm::Arguments gemm_arguments(const void* x, const void* compressed, const void* metadata,
                                                 const void* bias, void* y, std::int64_t M, std::int64_t N,
                                                 std::int64_t K, int sm_count, int device) {
    const ProblemShape shape = problem(M, N, K);
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = shape;
    args.mainloop.ptr_A = static_cast<const ElementA*>(compressed);
    args.mainloop.layout_a = SparseConfig::fill_layoutA(shape);
    args.mainloop.ptr_B = static_cast<const ElementB*>(x);
    args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, make_shape(int(M), int(K), 1));
    args.mainloop.ptr_E = static_cast<const ElementE*>(metadata);
    args.mainloop.layout_e = SparseConfig::fill_layoutE(shape);
    auto& fusion = args.epilogue.thread;
    fusion.alpha = ElementCompute(1);
    fusion.beta = ElementCompute(0);
    fusion.bias_ptr = static_cast<const Element*>(bias);  // null: zeros
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, make_shape(int(N), int(M), 1));
    args.epilogue.ptr_D = static_cast<ElementD*>(y);
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, make_shape(int(N), int(M), 1));
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    return args;
  }

  static bool can_implement(std::int64_t M, std::int64_t N, std::int64_t K) {
    // Any 16-byte aligned non-null addresses: CUTLASS's checks look at shapes, strides and layouts.
    const void* p = reinterpret_cast<const void*>(std::uintptr_t(256));
    auto gemm_args = gemm_arguments(p, p, p, p, const_cast<void*>(p), M, N, K, 1, 0);
    auto compress_args = compressor_arguments(p, const_cast<void*>(p), const_cast<void*>(p), N, K);
    return Gemm::can_implement(gemm_args) == cutlass::Status::kSuccess &&
           Compressor::can_implement(compress_args) == cutlass::Status::kSuccess;
  }

  static std::int64_t workspace_bytes(std::int64_t M, std::int64_t N, std::int64_t K, int sm_count) {
    return static_cast<std::int64_t>(
        Gemm::get_workspace_size(gemm_arguments(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, sm_count, 0)));
  }

  static Status gemm(const void* x, const void* compressed, const void* metadata, const void* bias, void* y,
                     void* workspace, std::int64_t workspace_size, std::int64_t M, std::int64_t N, std::int64_t K,
                     int sm_count, cudaStream_t stream) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return Status::kCudaError;
    auto args = gemm_arguments(x, compressed, metadata, bias, y, M, N, K, sm_count, device);
    if (static_cast<std::int64_t>(Gemm::get_workspace_size(args)) > workspace_size) return Status::kInvalidArgument;
    Gemm op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return Status::kInvalidArgument;
    if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return Status::kCudaError;
    if (op.run(stream) != cutlass::Status::kSuccess) return Status::kCudaError;
    return Status::kOk;
  }
};

using Sm90Bf16 = Sm90Sparse24<cutlass::bfloat16_t>;
using Sm90Fp16 = Sm90Sparse24<cutlass::half_t>;

// Calls fn.template operator()<Impl>() for the dtype's instantiation.
template <class Fn>
Status with_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::kBFloat16) return fn(Sm90Bf16{});
  if (dtype == DType::kFloat16) return fn(Sm90Fp16{});
  return Status::kUnsupported;
}

}  // namespace

Status sparse24_sm90_sizes(std::int64_t N, std::int64_t K, DType dtype, Sparse24Sm90Sizes* sizes) {
  if (sizes == nullptr || !shape_supported(0, N, K)) return Status::kInvalidArgument;
  return with_dtype(dtype, [&](auto impl) {
    *sizes = decltype(impl)::sizes(N, K);
    return Status::kOk;
  });
}

Status sparse24_sm90_compress(const void* dense, void* compressed, void* metadata, void* workspace, std::int64_t N,
                              std::int64_t K, DType dtype, cudaStream_t stream) {
  if (!shape_supported(0, N, K) || !aligned16(dense) || !aligned16(compressed) || !aligned16(metadata))
    return Status::kInvalidArgument;
  return with_dtype(dtype, [&](auto impl) {
    return decltype(impl)::compress(dense, compressed, metadata, workspace, N, K, stream);
  });
}

Status sparse24_sm90_can_implement(std::int64_t M, std::int64_t N, std::int64_t K, DType dtype, bool* ok) {
  if (ok == nullptr) return Status::kInvalidArgument;
  *ok = false;
  if (!shape_supported(M, N, K)) return Status::kOk;
  return with_dtype(dtype, [&](auto impl) {
    *ok = decltype(impl)::can_implement(M, N, K);
    return Status::kOk;
  });
}

Status sparse24_sm90_workspace_bytes(std::int64_t M, std::int64_t N, std::int64_t K, DType dtype, int sm_count,
                                     std::int64_t* bytes) {
  if (bytes == nullptr || !shape_supported(M, N, K) || sm_count <= 0) return Status::kInvalidArgument;
  return with_dtype(dtype, [&](auto impl) {
    *bytes = decltype(impl)::workspace_bytes(M, N, K, sm_count);
    return Status::kOk;
  });
}

Status sparse24_sm90_gemm(const void* x, const void* compressed, const void* metadata, const void* bias, void* y,
                          void* workspace, std::int64_t workspace_bytes, std::int64_t M, std::int64_t N,
                          std::int64_t K, DType dtype, int sm_count, cudaStream_t stream) {
  if (!shape_supported(M, N, K) || sm_count <= 0) return Status::kInvalidArgument;
  if (M == 0) return Status::kOk;
  if (!aligned16(x) || !aligned16(compressed) || !aligned16(metadata) || !aligned16(y) ||
      (bias != nullptr && !aligned16(bias)))
    return Status::kInvalidArgument;
  return with_dtype(dtype, [&](auto impl) {
    return decltype(impl)::gemm(x, compressed, metadata, bias, y, workspace, workspace_bytes, M, N, K, sm_count,
                                stream);
  });
}

#else  // CUDA < 12.2: no sm90 sparse GEMM in this build

Status sparse24_sm90_sizes(std::int64_t, std::int64_t, DType, Sparse24Sm90Sizes*) { return Status::kUnsupported; }
Status sparse24_sm90_compress(const void*, void*, void*, void*, std::int64_t, std::int64_t, DType, cudaStream_t) {
  return Status::kUnsupported;
}
Status sparse24_sm90_can_implement(std::int64_t, std::int64_t, std::int64_t, DType, bool*) {
  return Status::kUnsupported;
}
Status sparse24_sm90_workspace_bytes(std::int64_t, std::int64_t, std::int64_t, DType, int, std::int64_t*) {
  return Status::kUnsupported;
}
Status sparse24_sm90_gemm(const void*, const void*, const void*, const void*, void*, void*, std::int64_t,
                          std::int64_t, std::int64_t, std::int64_t, DType, int, cudaStream_t) {
  return Status::kUnsupported;
}

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

}  // namespace prunekit
