// _C_cuda.obs_sweep: pointers and sizes from Python (ops/obs_sweep.py validates and allocates).
#include <cstdint>
#include <string>

#include "prunekit/obs_sweep_cuda.h"
#include "registry.h"

namespace {

void obs_sweep(std::uintptr_t w, std::uintptr_t hinv, std::uintptr_t keep, std::uintptr_t q,
               std::uintptr_t err, std::uintptr_t loss, std::uintptr_t keep_out, std::int64_t rows,
               std::int64_t B, std::int64_t n, std::int64_t m, std::uintptr_t stream) {
  using prunekit::ptr;
  const std::string sizes = "rows=" + std::to_string(rows) + ", B=" + std::to_string(B) + ", n:m=" +
                            std::to_string(n) + ":" + std::to_string(m);
  if (B < 1 || B > prunekit::cuda::kObsSweepMaxBlock || n < 0 || m < 0) {
    prunekit::raise_if_error(prunekit::Status::kInvalidArgument, "obs_sweep",
                             sizes + "; expected 1 <= B <= 128 and n, m >= 0");
  }
  const char* cuda_error = "";
  prunekit::Status status;
  {
    pybind11::gil_scoped_release no_gil;
    status = prunekit::cuda::obs_sweep(ptr<const float>(w), ptr<const float>(hinv),
                                       ptr<const std::uint8_t>(keep), ptr<float>(q), ptr<float>(err),
                                       ptr<float>(loss), ptr<std::uint8_t>(keep_out), rows,
                                       static_cast<int>(B), static_cast<int>(n), static_cast<int>(m),
                                       reinterpret_cast<cudaStream_t>(stream), &cuda_error);
  }
  if (status == prunekit::Status::kCudaError) {
    prunekit::raise_if_error(status, "obs_sweep", cuda_error);
  }
  prunekit::raise_if_error(status, "obs_sweep",
                           sizes + "; expected 1 <= B <= 128, non-null pointers, and for m > 0: "
                                   "0 <= n <= m with B divisible by m");
}

void register_obs_sweep(pybind11::module_& m) {
  m.def("obs_sweep", &obs_sweep, "SparseGPT in-block OBS sweep (fp32, one launch per block)",
        pybind11::arg("w_ptr"), pybind11::arg("hinv_ptr"), pybind11::arg("keep_ptr"),
        pybind11::arg("q_ptr"), pybind11::arg("err_ptr"), pybind11::arg("loss_ptr"),
        pybind11::arg("keep_out_ptr"), pybind11::arg("rows"), pybind11::arg("B"), pybind11::arg("n"),
        pybind11::arg("m"), pybind11::arg("stream"));
}
prunekit::Registrar reg(register_obs_sweep);

}  // namespace
