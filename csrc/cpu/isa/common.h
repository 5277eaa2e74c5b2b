// Shared by the per-ISA kernel files (scalar.cpp, avx2.cpp, avx512.cpp), each compiled with its own target
// flags. Everything here has internal linkage (static / anonymous) and no standard-library templates, so no
// function compiled for one ISA can be merged into another file's code by the linker.
#pragma once
#include <cstdint>
#include <cstring>

#include "prunekit/sparse_linear_cpu.h"

namespace prunekit {
namespace {

struct Bf16 { std::uint16_t bits; };
struct Fp16 { std::uint16_t bits; };

static inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float half_to_float(std::uint16_t h) {
  std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    float f = static_cast<float>(mant) * (1.0f / 16777216.0f);  // subnormal: mant * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline float to_f32(float v) { return v; }
static inline float to_f32(Bf16 v) { return bits_to_float(static_cast<std::uint32_t>(v.bits) << 16); }
static inline float to_f32(Fp16 v) { return half_to_float(v.bits); }

static inline std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

// Position (0..3) inside its group of the j-th stored value of a 2:4 row, from the row's meta bytes.
static inline int s24_field(const std::uint8_t* meta, std::int64_t j) {
  return (meta[j >> 2] >> (2 * (j & 3))) & 3;
}

// Scalar pieces used for the tails of the SIMD paths and by the scalar path.
template <typename W>
static inline float s24_dot_groups(const W* v, const std::uint8_t* meta, const float* x, std::int64_t g0,
                                   std::int64_t g1) {
  float s = 0.f;
  for (std::int64_t g = g0; g < g1; ++g) {
    s += to_f32(v[2 * g]) * x[4 * g + s24_field(meta, 2 * g)];
    s += to_f32(v[2 * g + 1]) * x[4 * g + s24_field(meta, 2 * g + 1)];
  }
  return s;
}

// yrow[0:width] += sum over groups [g0, g1) of kept w * xT[pos, t0 : t0 + width]
template <typename W>
static inline void s24_axpy_groups(const W* v, const std::uint8_t* meta, const float* xT, std::int64_t ld,
                                   std::int64_t t0, std::int64_t width, float* yrow, std::int64_t g0,
                                   std::int64_t g1) {
  for (std::int64_t j = 2 * g0; j < 2 * g1; ++j) {
    const float w = to_f32(v[j]);
    const float* xp = xT + (4 * (j >> 1) + s24_field(meta, j)) * ld + t0;
    for (std::int64_t t = 0; t < width; ++t) yrow[t] += w * xp[t];
  }
}

// Dispatches a kernel template over the weight type.
#define PRUNEKIT_BY_DTYPE(dtype, FN, ...)                                       \
  do {                                                                          \
    switch (dtype) {                                                            \
      case DType::kFloat32: FN<float>(__VA_ARGS__); break;                      \
      case DType::kBFloat16: FN<Bf16>(__VA_ARGS__); break;                      \
      case DType::kFloat16: FN<Fp16>(__VA_ARGS__); break;                       \
      default: break;                                                           \
    }                                                                           \
  } while (0)

}  // namespace
}  // namespace prunekit
