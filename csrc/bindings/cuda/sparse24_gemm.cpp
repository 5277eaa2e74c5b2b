// pybind11 glue for the mma.sp 2:4 decode GEMM: integers in (pointers, sizes, stream), exception out.
#include <string>

#include "prunekit/sparse24_gemm.h"
#include "registry.h"

namespace {
using prunekit::ptr;

void sparse24_decode_gemm(std::uintptr_t x, std::uintptr_t values, std::uintptr_t meta, std::uintptr_t bias,
                          std::uintptr_t y, std::uintptr_t workspace, std::int64_t M, std::int64_t N, std::int64_t K,
                          int splits, int chunks_per_split, int dtype, std::uintptr_t stream) {
  prunekit::Status s = prunekit::sparse24_decode_gemm(
      ptr<const void>(x), ptr<const void>(values), ptr<const std::uint8_t>(meta), ptr<const void>(bias), ptr<void>(y),
      ptr<float>(workspace), M, N, K, splits, chunks_per_split, static_cast<prunekit::DType>(dtype),
      reinterpret_cast<cudaStream_t>(stream));
  std::string detail = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                       " splits=" + std::to_string(splits);
  if (s == prunekit::Status::kCudaError) detail += ": " + std::string(cudaGetErrorString(cudaGetLastError()));
  prunekit::raise_if_error(s, "sparse24_decode_gemm", detail);
}

void register_sparse24_gemm(pybind11::module_& m) {
  m.attr("SPARSE24_MAX_TOKENS") = prunekit::kSparse24MaxTokens;
  m.attr("SPARSE24_CHUNK_K") = prunekit::kSparse24ChunkK;
  m.attr("SPARSE24_ROWS_PER_BLOCK") = prunekit::kSparse24RowsPerBlock;
  m.attr("SPARSE24_MMA_SP_FORM") = prunekit::sparse24_mma_sp_form();
  m.def("sparse24_decode_gemm", &sparse24_decode_gemm,
        "y[M,N] = x[M,K] @ W.T + bias with W 2:4 (logical format); M <= 64, K % 64 == 0, bf16/fp16; "
        "workspace fp32 [splits, M, N]");
}
prunekit::Registrar reg(register_sparse24_gemm);
}  // namespace
