#include <cuda_runtime.h>

#include "registry.h"

namespace {
// Number of visible devices, or raises with the runtime's own words (no driver, no device...).
int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    prunekit::raise_if_error(prunekit::Status::kCudaError, "device_count", cudaGetErrorString(err));
  }
  return n;
}

void register_info(pybind11::module_& m) {
  m.attr("ABI_VERSION") = 1;
  m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;
  m.def("device_count", &device_count, "CUDA devices visible to the runtime prunekit was built with");
}
prunekit::Registrar reg(register_info);
}  // namespace
