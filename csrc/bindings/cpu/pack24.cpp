// pybind11 glue for the CPU 2:4 pack/unpack: integers in, the first bad group index out.
#include "prunekit/pack24.h"
#include "registry.h"

namespace {
using prunekit::ptr;

// Returns -1 on success, else the flat index of the first group with >2 nonzeros (Python words the error).
std::int64_t pack24(std::uintptr_t w, std::uintptr_t values, std::uintptr_t meta, std::int64_t rows, std::int64_t k,
                    int word_bytes) {
  std::int64_t bad = -1;
  prunekit::Status s;
  {
    pybind11::gil_scoped_release release;
    s = prunekit::pack24_cpu(ptr<const void>(w), ptr<void>(values), ptr<std::uint8_t>(meta), rows, k, word_bytes, &bad);
  }
  if (s == prunekit::Status::kInvalidData) return bad;
  prunekit::raise_if_error(s, "pack24", "rows=" + std::to_string(rows) + " k=" + std::to_string(k));
  return -1;
}

// Returns -1 on success, else the flat index of the first group whose metadata nibble is undefined.
std::int64_t unpack24(std::uintptr_t values, std::uintptr_t meta, std::uintptr_t w, std::int64_t rows, std::int64_t k,
                      int word_bytes) {
  std::int64_t bad = -1;
  prunekit::Status s;
  {
    pybind11::gil_scoped_release release;
    s = prunekit::unpack24_cpu(ptr<const void>(values), ptr<const std::uint8_t>(meta), ptr<void>(w), rows, k,
                               word_bytes, &bad);
  }
  if (s == prunekit::Status::kInvalidData) return bad;
  prunekit::raise_if_error(s, "unpack24", "rows=" + std::to_string(rows) + " k=" + std::to_string(k));
  return -1;
}

void register_pack24(pybind11::module_& m) {
  m.def("pack24", &pack24, "2:4 pack of a [rows, k] weight; returns -1 or the first group with >2 nonzeros");
  m.def("unpack24", &unpack24, "2:4 unpack; returns -1 or the first group with an undefined metadata nibble");
}
prunekit::Registrar reg(register_pack24);
}  // namespace
