// Portability macros shared by the CPU and CUDA sources.
#pragma once

// Per-element math (mask generator, cell formulas, ...) is written once and
// compiled for both backends, so the CPU tests also check what a GPU computes.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYPEFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYPEFT_HOST_DEVICE inline
#endif

// Hot CPU loops are compiled twice, for AVX2 and for the baseline ISA, and the
// loader picks one at run time: the wheel stays portable but the 32-bit
// multiplies of the mask hash vectorise where the CPU allows (4x measured).
#if !defined(__CUDACC__) && defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define PYPEFT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYPEFT_CPU_CLONES
#endif
