#include "registry.h"

namespace {
void register_info(pybind11::module_& m) {
  m.attr("ABI_VERSION") = 1;
#ifdef _OPENMP
  m.attr("OPENMP") = true;
#else
  m.attr("OPENMP") = false;
#endif
}
prunekit::Registrar reg(register_info);
}  // namespace
