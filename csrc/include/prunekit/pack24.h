// 2:4 pack/unpack on CPU (logical format, DESIGN.md §5). Values are copied as raw 16/32-bit words.
#pragma once
#include <cstdint>

#include "prunekit/status.h"

namespace prunekit {

// w: [rows, k] words of word_bytes (2 or 4); values: [rows, k/2]; meta: [rows, k/8] bytes.
// On kInvalidData, *bad_group is the flat index (row * k/4 + group) of the first group with more
// than two nonzeros; otherwise -1.
Status pack24_cpu(const void* w, void* values, std::uint8_t* meta, std::int64_t rows, std::int64_t k,
                  int word_bytes, std::int64_t* bad_group);

// Inverse of pack24_cpu. On kInvalidData, *bad_group is the flat group index of the first undefined
// nibble (0x0 0x1 0x2 0x3 0x5 0x6 0x7 0xA 0xB 0xF).
Status unpack24_cpu(const void* values, const std::uint8_t* meta, void* w, std::int64_t rows, std::int64_t k,
                    int word_bytes, std::int64_t* bad_group);

}  // namespace prunekit
