// pybind11 glue for the CPU bitmask unpack (csrc/cpu/bitmask_unpack.cpp): integers in, the mask's kept count out.
#include "prunekit/bitmask_unpack.h"
#include "registry.h"

namespace {
using prunekit::ptr;

// Returns the mask's kept count (Python checks it against the values' length on kInvalidData).
std::int64_t bitmask_unpack(std::uintptr_t values, std::int64_t values_len, std::uintptr_t mask, std::uintptr_t w,
                            std::int64_t rows, std::int64_t k, int word_bytes, int isa, int threads) {
  std::int64_t nnz = 0;
  prunekit::Status s;
  {
    pybind11::gil_scoped_release release;
    s = prunekit::bitmask_unpack_cpu(ptr<const void>(values), values_len, ptr<const std::uint8_t>(mask), ptr<void>(w),
                                     rows, k, word_bytes, static_cast<prunekit::CpuIsa>(isa), threads, &nnz);
  }
  if (s == prunekit::Status::kInvalidData) return nnz;
  prunekit::raise_if_error(s, "bitmask_unpack", "rows=" + std::to_string(rows) + " k=" + std::to_string(k));
  return nnz;
}

void register_bitmask_unpack(pybind11::module_& m) {
  m.def("bitmask_unpack", &bitmask_unpack, "bitmask (values, mask) -> dense [rows, k]; returns the mask's kept count "
        "(the values must hold it + 16 padding words, else nothing is written)");
}
prunekit::Registrar reg(register_bitmask_unpack);
}  // namespace
