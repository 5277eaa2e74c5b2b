// pybind11 glue for the CPU sparse linear kernels (csrc/cpu/sparse_linear_cpu.cpp). Python
// (prunekit/ops/sparse_cpu.py) validates dtypes, contiguity and shapes before handing out pointers.
#include "prunekit/sparse_linear_cpu.h"
#include "registry.h"

namespace {
using prunekit::ptr;

void sparse_linear_cpu(std::uintptr_t x, std::uintptr_t values, std::uintptr_t meta, std::uintptr_t row_offsets,
                       std::uintptr_t bias, std::uintptr_t y, std::int64_t M, std::int64_t N, std::int64_t K,
                       int dtype, int format, int isa, int threads) {
  prunekit::CpuSparseLinearParams p;
  p.x = ptr<const void>(x);
  p.values = ptr<const void>(values);
  p.meta = ptr<const std::uint8_t>(meta);
  p.row_offsets = ptr<const std::int64_t>(row_offsets);
  p.bias = ptr<const void>(bias);
  p.y = ptr<void>(y);
  p.M = M;
  p.N = N;
  p.K = K;
  p.dtype = static_cast<prunekit::DType>(dtype);
  p.format = static_cast<prunekit::CpuSparseFormat>(format);
  p.isa = static_cast<prunekit::CpuIsa>(isa);
  p.threads = threads;
  prunekit::Status s;
  {
    pybind11::gil_scoped_release release;
    s = prunekit::sparse_linear_cpu(p);
  }
  prunekit::raise_if_error(s, "sparse_linear_cpu",
                           "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                               " dtype code " + std::to_string(dtype) + " format " + std::to_string(format) +
                               " isa " + std::to_string(isa));
}

void register_sparse_linear_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sparse_linear_cpu", &sparse_linear_cpu, py::arg("x"), py::arg("values"), py::arg("meta"),
        py::arg("row_offsets"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("dtype"), py::arg("format"), py::arg("isa"), py::arg("threads"),
        "y[M, N] = x[M, K] W^T + bias with W in the 2:4 (format 0) or bitmask (format 1) layout; "
        "isa 0 auto, 1 scalar, 2 avx2, 3 avx512");
  m.def("flush_cache_lines", [](std::uintptr_t p, std::int64_t bytes) {
          return prunekit::flush_cache_lines(ptr<const void>(p), bytes);
        }, py::arg("ptr"), py::arg("bytes"),
        "Evict [ptr, ptr + bytes) from the CPU caches (clflush); False where the CPU has no such instruction");
  m.def("cpu_isa_supported", [](int isa) { return prunekit::cpu_isa_supported(static_cast<prunekit::CpuIsa>(isa)); },
        py::arg("isa"), "Whether this CPU runs the given sparse-kernel ISA path (0 auto, 1 scalar, 2 avx2, 3 avx512)");
  m.def("cpu_best_isa", []() { return static_cast<int>(prunekit::cpu_best_isa()); },
        "The ISA path the sparse CPU kernels use by default (1 scalar, 2 avx2, 3 avx512)");
}
prunekit::Registrar reg(register_sparse_linear_cpu);
}  // namespace
