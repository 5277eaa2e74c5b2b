// pybind11 glue for the v2 2:4 decode GEMM: integers in (pointers, sizes, stream), exception out.
#include <pybind11/stl.h>

#include <string>
#include <tuple>

#include "prunekit/sparse24_decode_v2.h"
#include "registry.h"

namespace {
using prunekit::ptr;

std::string pending_cuda_error() { return cudaGetErrorString(cudaGetLastError()); }

int decode_v2(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, std::uintptr_t locks,
              std::int64_t M, std::int64_t N, std::int64_t K, int dtype, int variant, int blocks,
              std::uintptr_t stream) {
  prunekit::DecodeV2Params p;
  p.x = ptr<const void>(x);
  p.weight = ptr<const std::uint8_t>(weight);
  p.bias = ptr<const void>(bias);
  p.y = ptr<void>(y);
  p.locks = ptr<int>(locks);
  p.M = M;
  p.N = N;
  p.K = K;
  p.dtype = static_cast<prunekit::DType>(dtype);
  p.variant = variant;
  p.blocks = blocks;
  p.stream = reinterpret_cast<cudaStream_t>(stream);
  const prunekit::Status s = prunekit::sparse24_decode_v2(p);
  if (s != prunekit::Status::kOk) {
    std::string detail = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                         " variant=" + std::to_string(variant) + " blocks=" + std::to_string(blocks);
    if (s == prunekit::Status::kCudaError) detail += ": " + pending_cuda_error();
    prunekit::raise_if_error(s, "sparse24_decode_v2", detail);
  }
  return p.launched_blocks;
}

std::tuple<int, int, int> variant_info(int index) {
  prunekit::DecodeV2Variant v{};
  prunekit::raise_if_error(prunekit::sparse24_decode_v2_variant(index, &v), "sparse24_decode_v2_variant",
                           "index " + std::to_string(index) + " of " +
                               std::to_string(prunekit::sparse24_decode_v2_variant_count()));
  return {v.warps, v.stages, v.chunks_per_stage};
}

int max_blocks(int variant, std::int64_t M, int dtype) {
  int out = 0;
  const prunekit::Status s =
      prunekit::sparse24_decode_v2_max_blocks(variant, M, static_cast<prunekit::DType>(dtype), &out);
  if (s != prunekit::Status::kOk) {
    std::string detail = "variant=" + std::to_string(variant) + " M=" + std::to_string(M);
    if (s == prunekit::Status::kCudaError) detail += ": " + pending_cuda_error();
    prunekit::raise_if_error(s, "sparse24_decode_v2_max_blocks", detail);
  }
  return out;
}

void register_decode_v2(pybind11::module_& m) {
  m.attr("DECODE_V2_MAX_TOKENS") = prunekit::kDecodeV2MaxTokens;
  m.attr("DECODE_V2_TILE_N") = prunekit::kDecodeV2TileN;
  m.attr("DECODE_V2_CHUNK_K") = prunekit::kDecodeV2ChunkK;
  m.attr("DECODE_V2_BLOCK_BYTES") = prunekit::kDecodeV2BlockBytes;
  m.attr("DECODE_V2_MMA_SP_FORM") = prunekit::sparse24_decode_v2_mma_sp_form();
  m.def("sparse24_decode_v2", &decode_v2,
        "y[M,N] = x[M,K] @ W.T + bias, W in the v2 decode layout; M <= 64, K % 8 == 0, bf16/fp16; "
        "locks: int32 [lock_count], zero (left zero); returns the grid launched");
  m.def("sparse24_decode_v2_variant_count", &prunekit::sparse24_decode_v2_variant_count);
  m.def("sparse24_decode_v2_variant", &variant_info, "(warps, stages, chunks per stage) of a compiled variant");
  m.def("sparse24_decode_v2_lock_count", &prunekit::sparse24_decode_v2_lock_count,
        "lock entries (block tiles) for N rows with a variant");
  m.def("sparse24_decode_v2_max_blocks", &max_blocks,
        "blocks of a variant resident at once on the current device for M tokens (the grid cap)");
}
prunekit::Registrar reg(register_decode_v2);
}  // namespace
