// Bitmask (unstructured) weight -> dense on the CPU: the inverse of ref/bitmask.pack, bit for bit (the kept
// values are copied as raw 16/32-bit words, everything else is +0).
#pragma once
#include <cstdint>

#include "prunekit/sparse_linear_cpu.h"
#include "prunekit/status.h"

namespace prunekit {

// values: values_len words of word_bytes (2 or 4): the kept values row after row, then >= 16 padding words;
// mask: [rows, k/8] (bit j of byte b: input 8b + j kept); w: [rows, k] out. k % 8 == 0. *nnz: the mask's kept
// count; kInvalidData when values_len != *nnz + 16 (w untouched). isa: kAuto/kAvx512/kAvx512Bf16 run the
// AVX-512 vpexpandd path, kAvx2/kScalar the portable loop; kUnsupported for a path this CPU cannot run.
Status bitmask_unpack_cpu(const void* values, std::int64_t values_len, const std::uint8_t* mask, void* w,
                          std::int64_t rows, std::int64_t k, int word_bytes, CpuIsa isa, int threads,
                          std::int64_t* nnz);

// One row (avx512 build, csrc/cpu/isa/bitmask_unpack_avx512.cpp): v the row's first value (16 words past the
// row's last value readable), mk its k/8 mask bytes, w its k outputs.
namespace avx512 {
void bitmask_unpack_row(const void* v, const std::uint8_t* mk, void* w, std::int64_t k, int word_bytes);
}

}  // namespace prunekit
