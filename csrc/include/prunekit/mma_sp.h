// The sparse MMA instruction form, one gate for every kernel that issues it (sparse24_gemm.cu,
// sparse24_decode_v2.cu). mma.sp::ordered_metadata needs PTX ISA 8.5 (CUDA >= 12.5); older toolkits only know
// plain mma.sp. Our metadata always lists the kept positions in ascending order, which is what both forms read
// on sm_80+ (CUTLASS gates the same way, include/cutlass/arch/mma_sparse_sm80.h); the ordered form is
// preferred where it exists (the plain one is deprecated in PTX ISA 8.5). PRUNEKIT_MMA_SP_ORDERED=0/1
// overrides (tests compile both forms); each module reports the form it holds.
#pragma once

#ifndef PRUNEKIT_MMA_SP_ORDERED
#if defined(__CUDACC_VER_MAJOR__) && \
    ((__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5))
#define PRUNEKIT_MMA_SP_ORDERED 1
#else
#define PRUNEKIT_MMA_SP_ORDERED 0
#endif
#endif
#if PRUNEKIT_MMA_SP_ORDERED
#define PRUNEKIT_MMA_SP "mma.sp::ordered_metadata"
#else
#define PRUNEKIT_MMA_SP "mma.sp"
#endif
