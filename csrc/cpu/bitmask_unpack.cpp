// Bitmask unpack on the CPU (prunekit/bitmask_unpack.h): per-row value offsets from the mask's popcounts,
// then rows in parallel, each by the AVX-512 expand (isa/bitmask_unpack_avx512.cpp) or the portable loop.
#include "prunekit/bitmask_unpack.h"

#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace prunekit {
namespace {

// Portable row: per mask byte, 8 outputs; a cleared bit writes 0 and does not advance (branch-free).
template <typename Word>
void unpack_row_portable(const Word* v, const std::uint8_t* mk, Word* w, std::int64_t k) {
  for (std::int64_t b = 0; b < k / 8; ++b) {
    const unsigned m = mk[b];
    Word* o = w + 8 * b;
    if (m == 0) {
      for (int j = 0; j < 8; ++j) o[j] = 0;
      continue;
    }
    for (int j = 0; j < 8; ++j) {
      const unsigned on = (m >> j) & 1u;
      o[j] = on ? *v : Word(0);  // *v: at most the first padding word
      v += on;
    }
  }
}

std::int64_t row_count(const std::uint8_t* mk, std::int64_t nb) {
  std::int64_t c = 0, b = 0;
  for (; b + 8 <= nb; b += 8) {
    std::uint64_t u;
    std::memcpy(&u, mk + b, 8);
    c += __builtin_popcountll(u);
  }
  for (; b < nb; ++b) c += __builtin_popcount(mk[b]);
  return c;
}

// A fresh output (torch.empty of a large weight: new, untouched pages) would take one page fault per 4 KB as
// it is written (~0.45 ms per MB here, more than the unpack itself): ask for 2 MB pages on its aligned interior.
void advise_huge_pages(void* p, std::int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = 2u << 20;
  const std::uintptr_t b = reinterpret_cast<std::uintptr_t>(p), e = b + static_cast<std::uintptr_t>(bytes);
  const std::uintptr_t b2 = (b + kHuge - 1) & ~(kHuge - 1), e2 = e & ~(kHuge - 1);
  if (e2 > b2) madvise(reinterpret_cast<void*>(b2), e2 - b2, MADV_HUGEPAGE);  // advice only: errors ignored
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

Status bitmask_unpack_cpu(const void* values, std::int64_t values_len, const std::uint8_t* mask, void* w,
                          std::int64_t rows, std::int64_t k, int word_bytes, CpuIsa isa, int threads,
                          std::int64_t* nnz) {
  *nnz = 0;
  if (rows < 0 || k < 0 || k % 8 != 0 || (word_bytes != 2 && word_bytes != 4)) return Status::kInvalidArgument;
  if (!cpu_isa_supported(isa)) return Status::kUnsupported;
  const CpuIsa use = isa == CpuIsa::kAuto ? cpu_best_isa() : isa;
  const bool simd = use == CpuIsa::kAvx512 || use == CpuIsa::kAvx512Bf16;
  const std::int64_t nb = k / 8;
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(rows) + 1, 0);
  const int nt = threads < 1 ? 1 : threads;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (std::int64_t n = 0; n < rows; ++n) offsets[n + 1] = row_count(mask + n * nb, nb);
  for (std::int64_t n = 0; n < rows; ++n) offsets[n + 1] += offsets[n];
  *nnz = offsets[rows];
  if (values_len != *nnz + 16) return Status::kInvalidData;
  if (rows == 0 || k == 0) return Status::kOk;
  if (values == nullptr || mask == nullptr || w == nullptr) return Status::kInvalidArgument;
  advise_huge_pages(w, rows * k * word_bytes);
  // ~one thread per 1M outputs (a write-bound pass)
  const std::int64_t useful = rows * k / (1 << 20) + 1;
  const int run = nt < useful ? nt : static_cast<int>(useful);
  const char* vb = static_cast<const char*>(values);
  char* wb = static_cast<char*>(w);
#pragma omp parallel for schedule(static) num_threads(run)
  for (std::int64_t n = 0; n < rows; ++n) {
    const void* v = vb + offsets[n] * word_bytes;
    void* out = wb + n * k * word_bytes;
#ifdef PRUNEKIT_CPU_X86_ISA
    if (simd) {
      avx512::bitmask_unpack_row(v, mask + n * nb, out, k, word_bytes);
      continue;
    }
#endif
    if (word_bytes == 2)
      unpack_row_portable(static_cast<const std::uint16_t*>(v), mask + n * nb, static_cast<std::uint16_t*>(out), k);
    else
      unpack_row_portable(static_cast<const std::uint32_t*>(v), mask + n * nb, static_cast<std::uint32_t*>(out), k);
  }
  (void)simd;
  return Status::kOk;
}

}  // namespace prunekit
