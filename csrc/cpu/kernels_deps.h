// Every header the CPU kernels (kernels.h) need, and the BLAS functions they call: a variant (kernels_*.cpp)
// includes this before its target pragma, so that nothing outside kernels.h is compiled for its instruction set
// (inline functions of these headers instantiated under a variant's target could otherwise be linked in for
// every caller, on CPUs without those instructions).
#pragma once

#include "../cov_pool_ext.h"
#include <ATen/core/Tensor.h>

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#if AT_BUILD_WITH_LAPACK()
#include <ATen/native/BatchLinearAlgebra.h>
#endif
#if AT_MKL_ENABLED()
extern "C" int MKL_Set_Num_Threads_Local(int nthreads);  // MKL service function (C interface), in libtorch_cpu
#endif
#if AT_BUILD_WITH_BLAS()
// The Fortran BLAS products libtorch_cpu exports (MKL or OpenBLAS): called directly, a product of the small
// matrices of C = 64 costs no dispatcher, argument checks or output resize (at::mm_out did, ~8 times a sample).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}
#endif

#include <immintrin.h>  // sqrtps / sqrtpd (small_eigh.h: lane_sqrt)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
