#include "prunekit/obs_sweep.h"
#include "registry.h"

namespace {

void obs_sweep(std::uintptr_t w, std::uintptr_t hinv, std::uintptr_t keep, std::uintptr_t q,
               std::uintptr_t err, std::uintptr_t loss, std::uintptr_t keep_out, int64_t rows,
               int64_t B, int64_t n, int64_t m) {
  using prunekit::ptr;
  prunekit::Status s;
  {
    pybind11::gil_scoped_release release;
    s = prunekit::obs_sweep_cpu(ptr<const float>(w), ptr<const float>(hinv), ptr<const uint8_t>(keep),
                                ptr<float>(q), ptr<float>(err), ptr<float>(loss),
                                ptr<uint8_t>(keep_out), rows, B, n, m);
  }
  prunekit::raise_if_error(s, "obs_sweep",
                           "rows=" + std::to_string(rows) + " B=" + std::to_string(B) +
                               " n=" + std::to_string(n) + " m=" + std::to_string(m));
}

void register_obs_sweep(pybind11::module_& m) {
  m.def("obs_sweep", &obs_sweep,
        "SparseGPT in-block OBS sweep on float32 CPU buffers (see prunekit/obs_sweep.h)",
        pybind11::arg("w_ptr"), pybind11::arg("hinv_ptr"), pybind11::arg("keep_ptr"),
        pybind11::arg("q_ptr"), pybind11::arg("err_ptr"), pybind11::arg("loss_ptr"),
        pybind11::arg("keep_out_ptr"), pybind11::arg("rows"), pybind11::arg("B"), pybind11::arg("n"),
        pybind11::arg("m"));
}
prunekit::Registrar reg(register_obs_sweep);

}  // namespace
