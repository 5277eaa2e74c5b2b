// The module body for both _C and _C_cuda: it only runs the registrars that the linked binding
// files created.
#include "registry.h"

PYBIND11_MODULE(PRUNEKIT_MODULE_NAME, m) {
  m.doc() = "prunekit native kernels (raw pointers in, status out; no libtorch)";
  for (auto fn : prunekit::registry()) fn(m);
}
