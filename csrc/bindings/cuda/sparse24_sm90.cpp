// pybind11 glue for the Hopper 2:4 prefill GEMM (csrc/cuda/sparse24_sm90.cu): integers in (pointers,
// sizes, stream), exception out. Built with or without CUTLASS: without it or without an sm_90a target
// (PRUNEKIT_HAVE_CUTLASS undefined, the .cu not compiled) only the query functions exist and say why.
#include <cuda_runtime.h>

#include <string>

#include "registry.h"

#if defined(PRUNEKIT_HAVE_CUTLASS)
#include "prunekit/sparse24_sm90.h"
#endif

namespace {

#if defined(PRUNEKIT_HAVE_CUTLASS)
using prunekit::ptr;

std::string shape_detail(std::int64_t M, std::int64_t N, std::int64_t K) {
  return "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
}

void raise_cuda_aware(prunekit::Status s, const char* op, std::string detail) {
  if (s == prunekit::Status::kCudaError) {
    cudaError_t err = cudaGetLastError();  // CUTLASS may already have consumed it
    detail += err == cudaSuccess ? ": the CUTLASS kernel failed to initialize or launch" : std::string(": ") +
                                                                                              cudaGetErrorString(err);
  }
  prunekit::raise_if_error(s, op, detail);
}

bool compiled() { return prunekit::sparse24_sm90_compiled(); }

std::string reason() {
  return compiled() ? "" : "this build's CUDA toolkit is older than 12.2 (no sm90 sparse GEMM in CUTLASS)";
}

pybind11::tuple sizes(std::int64_t N, std::int64_t K, int dtype) {
  prunekit::Sparse24Sm90Sizes s;
  raise_cuda_aware(prunekit::sparse24_sm90_sizes(N, K, static_cast<prunekit::DType>(dtype), &s), "sparse24_sm90_sizes",
                   shape_detail(0, N, K) + " (needs N % 8 == 0, K % 16 == 0, bf16/fp16)");
  return pybind11::make_tuple(s.compressed_bytes, s.metadata_bytes, s.compress_workspace_bytes);
}

void compress(std::uintptr_t dense, std::uintptr_t compressed, std::uintptr_t metadata, std::uintptr_t workspace,
              std::int64_t N, std::int64_t K, int dtype, std::uintptr_t stream) {
  raise_cuda_aware(prunekit::sparse24_sm90_compress(ptr<const void>(dense), ptr<void>(compressed), ptr<void>(metadata),
                                                    ptr<void>(workspace), N, K, static_cast<prunekit::DType>(dtype),
                                                    reinterpret_cast<cudaStream_t>(stream)),
                   "sparse24_sm90_compress", shape_detail(0, N, K));
}

bool can_implement(std::int64_t M, std::int64_t N, std::int64_t K, int dtype) {
  bool ok = false;
  raise_cuda_aware(prunekit::sparse24_sm90_can_implement(M, N, K, static_cast<prunekit::DType>(dtype), &ok),
                   "sparse24_sm90_can_implement", shape_detail(M, N, K));
  return ok;
}

std::int64_t workspace_bytes(std::int64_t M, std::int64_t N, std::int64_t K, int dtype, int sm_count) {
  std::int64_t bytes = 0;
  raise_cuda_aware(
      prunekit::sparse24_sm90_workspace_bytes(M, N, K, static_cast<prunekit::DType>(dtype), sm_count, &bytes),
      "sparse24_sm90_workspace_bytes", shape_detail(M, N, K));
  return bytes;
}

void gemm(std::uintptr_t x, std::uintptr_t compressed, std::uintptr_t metadata, std::uintptr_t bias, std::uintptr_t y,
          std::uintptr_t workspace, std::int64_t workspace_size, std::int64_t M, std::int64_t N, std::int64_t K,
          int dtype, int sm_count, std::uintptr_t stream) {
  raise_cuda_aware(prunekit::sparse24_sm90_gemm(ptr<const void>(x), ptr<const void>(compressed),
                                                ptr<const void>(metadata), ptr<const void>(bias), ptr<void>(y),
                                                ptr<void>(workspace), workspace_size, M, N, K,
                                                static_cast<prunekit::DType>(dtype), sm_count,
                                                reinterpret_cast<cudaStream_t>(stream)),
                   "sparse24_sm90_gemm", shape_detail(M, N, K));
}
#else
bool compiled() { return false; }
std::string reason() {
#if defined(PRUNEKIT_SM90_SKIPPED) && PRUNEKIT_SM90_SKIPPED == 2
  return "built without the sm_90a target: CMAKE_CUDA_ARCHITECTURES must include 90a";
#else
  return "built without CUTLASS: set CUTLASS_DIR or install the nvidia-cutlass Python package, then rebuild";
#endif
}
#endif

void register_sparse24_sm90(pybind11::module_& m) {
  m.def("sparse24_sm90_compiled", &compiled, "True when the Hopper (sm_90a) CUTLASS 2:4 GEMM is in this build");
  m.def("sparse24_sm90_reason", &reason, "Why the Hopper 2:4 GEMM is not in this build ('' when it is)");
#if defined(PRUNEKIT_HAVE_CUTLASS)
  m.def("sparse24_sm90_sizes", &sizes,
        "(compressed_bytes, metadata_bytes, compress_workspace_bytes) of CUTLASS's sm90 format for W [N, K]");
  m.def("sparse24_sm90_compress", &compress,
        "dense 2:4 W [N, K] -> CUTLASS sm90 compressed A + metadata (buffers of sparse24_sm90_sizes)");
  m.def("sparse24_sm90_can_implement", &can_implement,
        "host-only: whether CUTLASS accepts y[M,N] = x[M,K] @ W.T for this dtype (no device touched)");
  m.def("sparse24_sm90_workspace_bytes", &workspace_bytes, "device workspace bytes of sparse24_sm90_gemm");
  m.def("sparse24_sm90_gemm", &gemm,
        "y[M,N] = x[M,K] @ W.T + bias on Hopper; W as produced by sparse24_sm90_compress; bf16/fp16");
#endif
}
prunekit::Registrar reg(register_sparse24_sm90);
}  // namespace
