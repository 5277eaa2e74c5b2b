// Bitmask unpack, one row, AVX-512F (compiled with the avx512.cpp flags; called only when the CPU has them):
// per 16 inputs, 16 words loaded from the row's value cursor and vpexpandd'ed to their lanes by the 16 mask
// bits (zero elsewhere); 16-bit words are widened to 32 bits for the expand and narrowed for the store.
#include <immintrin.h>

#include <cstring>

#include "prunekit/bitmask_unpack.h"

namespace prunekit {
namespace avx512 {

void bitmask_unpack_row(const void* v, const std::uint8_t* mk, void* w, std::int64_t k, int word_bytes) {
  const std::int64_t c16 = k / 16;
  const bool tail = (k / 8) & 1;  // a last 8 inputs
  if (word_bytes == 4) {
    const std::uint32_t* vp = static_cast<const std::uint32_t*>(v);
    std::uint32_t* o = static_cast<std::uint32_t*>(w);
    for (std::int64_t c = 0; c < c16; ++c) {
      std::uint16_t m;
      std::memcpy(&m, mk + 2 * c, 2);
      _mm512_storeu_si512(o + 16 * c, _mm512_maskz_expand_epi32(m, _mm512_loadu_si512(vp)));
      vp += __builtin_popcount(m);
    }
    if (tail) {
      const __mmask16 m = mk[2 * c16];
      _mm512_mask_storeu_epi32(o + 16 * c16, 0xFF, _mm512_maskz_expand_epi32(m, _mm512_loadu_si512(vp)));
    }
  } else {
    const std::uint16_t* vp = static_cast<const std::uint16_t*>(v);
    std::uint16_t* o = static_cast<std::uint16_t*>(w);
    auto expand16 = [&](__mmask16 m) {
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp)));
      vp += __builtin_popcount(m);
      return _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(m, wide));
    };
    for (std::int64_t c = 0; c < c16; ++c) {
      std::uint16_t m;
      std::memcpy(&m, mk + 2 * c, 2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c), expand16(m));
    }
    if (tail) _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16 * c16), _mm256_castsi256_si128(expand16(mk[2 * c16])));
  }
}

}  // namespace avx512
}  // namespace prunekit
