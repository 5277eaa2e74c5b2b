// Status codes shared by every native kernel. Kernels never throw; bindings turn a status into a
// Python exception (csrc/bindings/registry.h).
#pragma once

namespace prunekit {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a size, stride or pattern the kernel cannot handle
  kUnsupported = 2,      // a dtype/architecture this build has no kernel for
  kNumerical = 3,        // NaN/Inf or a non-positive pivot met inside the kernel
  kInvalidData = 4,      // malformed packed data (e.g. an undefined 2:4 metadata nibble)
  kCudaError = 5,        // a CUDA runtime call failed (launch, sync)
};

inline const char* status_name(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    case Status::kNumerical: return "numerical error";
    case Status::kInvalidData: return "invalid data";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

// Dtype codes passed from Python (prunekit/_native.py keeps the same table).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace prunekit
