// Python glue for the CPU selection kernels: integers in (data pointers, sizes), exceptions out.
// prunekit/ops/select_mask.py validates dtypes, devices, contiguity and shapes first.
#include "prunekit/nm_select.h"
#include "registry.h"

namespace {
using prunekit::ptr;

void row_keep_mask(std::uintptr_t scores, std::uintptr_t keep, std::int64_t rows, std::int64_t width,
                   std::int64_t n_prune) {
  prunekit::raise_if_error(
      prunekit::row_keep_mask_f32(ptr<const float>(scores), ptr<std::uint8_t>(keep), rows, width, n_prune),
      "row_keep_mask", "rows=" + std::to_string(rows) + " width=" + std::to_string(width) +
                           " n_prune=" + std::to_string(n_prune));
}

void nm_keep_mask(std::uintptr_t scores, std::uintptr_t keep, std::int64_t rows, std::int64_t width, int n,
                  int m) {
  prunekit::raise_if_error(
      prunekit::nm_keep_mask_f32(ptr<const float>(scores), ptr<std::uint8_t>(keep), rows, width, n, m),
      "nm_keep_mask", std::to_string(n) + ":" + std::to_string(m) + " width=" + std::to_string(width));
}

void wanda_keep_mask(std::uintptr_t weight, int dtype, std::uintptr_t sqrt_norm, std::uintptr_t keep,
                     std::int64_t rows, std::int64_t width, std::int64_t n_prune, int n, int m) {
  prunekit::raise_if_error(
      prunekit::wanda_keep_mask(ptr<const void>(weight), static_cast<prunekit::DType>(dtype),
                                ptr<const float>(sqrt_norm), ptr<std::uint8_t>(keep), rows, width, n_prune, n, m),
      "wanda_keep_mask", "dtype code " + std::to_string(dtype) + " width=" + std::to_string(width));
}

void register_nm_select(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("row_keep_mask", &row_keep_mask, py::arg("scores"), py::arg("keep"), py::arg("rows"), py::arg("width"),
        py::arg("n_prune"), py::call_guard<py::gil_scoped_release>(),
        "Per-row keep mask of a float32 score matrix: prune the n_prune lowest of each row.");
  m.def("nm_keep_mask", &nm_keep_mask, py::arg("scores"), py::arg("keep"), py::arg("rows"), py::arg("width"),
        py::arg("n"), py::arg("m"), py::call_guard<py::gil_scoped_release>(),
        "N:M keep mask of a float32 score matrix: keep the n highest of every m consecutive scores.");
  m.def("wanda_keep_mask", &wanda_keep_mask, py::arg("weight"), py::arg("dtype"), py::arg("sqrt_norm"),
        py::arg("keep"), py::arg("rows"), py::arg("width"), py::arg("n_prune"), py::arg("n"), py::arg("m"),
        py::call_guard<py::gil_scoped_release>(),
        "Wanda keep mask in one pass: |W| * sqrt_norm, then per-row (m=0) or N:M selection.");
}
prunekit::Registrar reg(register_nm_select);
}  // namespace
