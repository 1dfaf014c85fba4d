// The CPU kernels (kernels.h) compiled once per instruction set, each into its own namespace: the baseline
// (any x86-64, or the compiler's default target elsewhere) and, where GCC >= 12 builds for x86-64, the
// x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512) levels. cov_pool_ext.cpp registers the ops and calls the
// variant picked for the CPU (or by THREEG_EXT_ISA); each variant's file includes kernels.h under its target.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#define THREEG_X86_VARIANTS 1
#else
#define THREEG_X86_VARIANTS 0
#endif

#define THREEG_DECLARE_CPU_VARIANT(ns)                                                                                \
  namespace threeg {                                                                                                  \
  namespace ns {                                                                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x,                             \
                                                                     const std::optional<at::Tensor>& weight,        \
                                                                     int64_t iters, double eps,                      \
                                                                     c10::string_view order, bool keep_iterates,     \
                                                                     c10::string_view precision);                    \
  std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,                            \
                                              const std::optional<at::Tensor>& weight, const at::Tensor& out,        \
                                              const at::Tensor& A, const at::Tensor& tr, const at::Tensor& iterates, \
                                              int64_t iters, c10::string_view order, c10::string_view precision);    \
  int64_t small_eigh_max(bool float64);                                                                               \
  }                                                                                                                   \
  }

THREEG_DECLARE_CPU_VARIANT(cpu_baseline)
#if THREEG_X86_VARIANTS
THREEG_DECLARE_CPU_VARIANT(cpu_x86_64_v3)
THREEG_DECLARE_CPU_VARIANT(cpu_x86_64_v4)
#endif
