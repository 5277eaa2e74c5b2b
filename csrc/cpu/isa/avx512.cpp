// AVX-512F/BW/VL path (compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; called only when the CPU
// has them). The kernels: avx512_body.inc.
#define PRUNEKIT_ISA_NS avx512
#include "avx512_body.inc"
