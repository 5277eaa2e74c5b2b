// AVX-512 with BF16 and VBMI2 (Zen 4, Sapphire Rapids and later; compiled with the avx512.cpp flags plus
// -mavx512bf16 -mavx512vbmi2; called only when the CPU has them): the avx512 kernels plus the vdpbf16ps 2:4
// kernel for bf16 at M > 1 and the kept-values-only bitmask kernel at M == 1 (avx512_body.inc).
#define PRUNEKIT_ISA_NS avx512bf16
#define PRUNEKIT_AVX512_BF16 1
#include "avx512_body.inc"
