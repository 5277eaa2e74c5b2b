// Each binding file registers its functions with a static Registrar, so adding a kernel never edits
// a shared file: module.cpp runs every registrar when Python imports the module.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "prunekit/status.h"

namespace prunekit {

using RegisterFn = void (*)(pybind11::module_&);

inline std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}

struct Registrar {
  explicit Registrar(RegisterFn fn) { registry().push_back(fn); }
};

// Turns a kernel status into a Python exception that names the op.
inline void raise_if_error(Status s, const char* op, const std::string& detail = "") {
  if (s == Status::kOk) return;
  std::string msg = std::string(op) + ": " + status_name(s);
  if (!detail.empty()) msg += " (" + detail + ")";
  if (s == Status::kInvalidArgument || s == Status::kInvalidData) throw pybind11::value_error(msg);
  if (s == Status::kNumerical) throw pybind11::value_error(msg);
  throw std::runtime_error(msg);
}

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace prunekit
