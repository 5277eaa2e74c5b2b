#include "prunekit/pack24.h"

#include <algorithm>
#include <vector>

namespace prunekit {
namespace {

// A nibble is valid when it names two distinct positions in ascending order.
bool valid_nibble(unsigned nib) { return (nib & 3u) < (nib >> 2); }

template <typename Word>
bool is_nonzero(Word v) {
  constexpr Word magnitude = static_cast<Word>(~Word(0)) >> 1;  // every bit but the sign
  return (v & magnitude) != 0;
}

// Packs one row; returns the first group with >2 nonzeros, or -1.
template <typename Word>
std::int64_t pack_row(const Word* w, Word* values, std::uint8_t* meta, std::int64_t k) {
  for (std::int64_t g = 0; g < k / 4; ++g) {
    const Word* x = w + 4 * g;
    int count = 0;
    for (int j = 0; j < 4; ++j) count += is_nonzero(x[j]);
    if (count > 2) return g;
    int need_fill = 2 - count;  // lowest unused positions become explicit zeros
    int pos[2];
    int n = 0;
    for (int j = 0; j < 4; ++j) {
      bool keep = is_nonzero(x[j]);
      if (!keep && need_fill > 0) {
        keep = true;
        --need_fill;
      }
      if (keep) pos[n++] = j;
    }
    values[2 * g] = x[pos[0]];
    values[2 * g + 1] = x[pos[1]];
    unsigned nib = static_cast<unsigned>(pos[0] | (pos[1] << 2));
    std::uint8_t& byte = meta[g / 2];
    byte = (g % 2 == 0) ? static_cast<std::uint8_t>(nib) : static_cast<std::uint8_t>(byte | (nib << 4));
  }
  return -1;
}

template <typename Word>
std::int64_t unpack_row(const Word* values, const std::uint8_t* meta, Word* w, std::int64_t k) {
  for (std::int64_t g = 0; g < k / 4; ++g) {
    unsigned nib = (meta[g / 2] >> (4 * (g % 2))) & 0xFu;
    if (!valid_nibble(nib)) return g;
    Word* x = w + 4 * g;
    x[0] = x[1] = x[2] = x[3] = Word(0);
    x[nib & 3u] = values[2 * g];
    x[nib >> 2] = values[2 * g + 1];
  }
  return -1;
}

// Runs row_fn over rows in parallel and keeps the lowest (row, group) failure.
template <typename RowFn>
Status for_rows(std::int64_t rows, std::int64_t k, std::int64_t* bad_group, RowFn row_fn) {
  std::vector<std::int64_t> bad(static_cast<size_t>(rows), -1);
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) bad[static_cast<size_t>(r)] = row_fn(r);
  *bad_group = -1;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (bad[static_cast<size_t>(r)] >= 0) {
      *bad_group = r * (k / 4) + bad[static_cast<size_t>(r)];
      return Status::kInvalidData;
    }
  }
  return Status::kOk;
}

template <typename Word>
Status pack_typed(const void* w, void* values, std::uint8_t* meta, std::int64_t rows, std::int64_t k,
                  std::int64_t* bad_group) {
  auto* src = static_cast<const Word*>(w);
  auto* dst = static_cast<Word*>(values);
  return for_rows(rows, k, bad_group,
                  [&](std::int64_t r) { return pack_row(src + r * k, dst + r * (k / 2), meta + r * (k / 8), k); });
}

template <typename Word>
Status unpack_typed(const void* values, const std::uint8_t* meta, void* w, std::int64_t rows, std::int64_t k,
                    std::int64_t* bad_group) {
  auto* src = static_cast<const Word*>(values);
  auto* dst = static_cast<Word*>(w);
  return for_rows(rows, k, bad_group,
                  [&](std::int64_t r) { return unpack_row(src + r * (k / 2), meta + r * (k / 8), dst + r * k, k); });
}

bool valid_sizes(std::int64_t rows, std::int64_t k, int word_bytes) {
  return rows >= 0 && k >= 0 && k % 8 == 0 && (word_bytes == 2 || word_bytes == 4);
}

}  // namespace

Status pack24_cpu(const void* w, void* values, std::uint8_t* meta, std::int64_t rows, std::int64_t k,
                  int word_bytes, std::int64_t* bad_group) {
  *bad_group = -1;
  if (!valid_sizes(rows, k, word_bytes)) return Status::kInvalidArgument;
  return word_bytes == 2 ? pack_typed<std::uint16_t>(w, values, meta, rows, k, bad_group)
                         : pack_typed<std::uint32_t>(w, values, meta, rows, k, bad_group);
}

Status unpack24_cpu(const void* values, const std::uint8_t* meta, void* w, std::int64_t rows, std::int64_t k,
                    int word_bytes, std::int64_t* bad_group) {
  *bad_group = -1;
  if (!valid_sizes(rows, k, word_bytes)) return Status::kInvalidArgument;
  return word_bytes == 2 ? unpack_typed<std::uint16_t>(values, meta, w, rows, k, bad_group)
                         : unpack_typed<std::uint32_t>(values, meta, w, rows, k, bad_group);
}

}  // namespace prunekit
