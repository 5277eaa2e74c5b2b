// Evicting one buffer from the caches (for the CPU route's cold-weight timings, ops/sparse_cpu_route.py).
// clflush is part of SSE2, so of every x86-64 CPU: this file needs no target flags.
#include <cstdint>

#include "prunekit/sparse_linear_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace prunekit {

bool flush_cache_lines(const void* p, std::int64_t bytes) {
#if defined(__x86_64__) || defined(_M_X64)
  const auto* c = static_cast<const char*>(p);
  constexpr std::int64_t kLine = 64;
  const std::int64_t skew = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(c) % kLine);
  for (std::int64_t i = -skew; i < bytes; i += kLine) _mm_clflush(c + i);
  _mm_mfence();
  return true;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

}  // namespace prunekit
