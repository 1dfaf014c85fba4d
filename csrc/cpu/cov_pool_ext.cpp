// The CPU kernels' registration: threeg::cov_pool_ext_forward / threeg::cov_pool_ext_backward call the variant of
// kernels.h (the math and the code: there) compiled for the best instruction set this CPU has (cpu_variants.h),
// or the one THREEG_EXT_ISA names: "auto" (or unset), "baseline", "x86-64-v3" or "x86-64-v4".
#include "../cov_pool_ext.h"
#include "cpu_variants.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace threeg {
namespace {

enum class CpuVariant { kBaseline = 0, kV3 = 1, kV4 = 2 };
constexpr const char* kVariantNames[] = {"baseline", "x86-64-v3", "x86-64-v4"};

// The best variant this build has and this CPU runs (asked once).
CpuVariant best_variant() {
#if THREEG_X86_VARIANTS
  static const CpuVariant best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return CpuVariant::kV4;
    if (__builtin_cpu_supports("x86-64-v3")) return CpuVariant::kV3;
    return CpuVariant::kBaseline;
  }();
  return best;
#else
  return CpuVariant::kBaseline;
#endif
}

// THREEG_EXT_ISA, read at every call (a getenv: no measurable cost) so that a test can run each variant.
CpuVariant chosen_variant() {
  const char* env = std::getenv("THREEG_EXT_ISA");
  const std::string s = env ? env : "";
  if (s.empty() || s == "auto") return best_variant();
  for (int v = 0; v < 3; ++v) {
    if (s != kVariantNames[v]) continue;
    TORCH_CHECK(v <= static_cast<int>(best_variant()), "THREEG_EXT_ISA='", s, "' needs a CPU with ", s,
                " and a build that compiled it; this one runs up to '",
                kVariantNames[static_cast<int>(best_variant())], "'");
    return static_cast<CpuVariant>(v);
  }
  TORCH_CHECK(false, "THREEG_EXT_ISA must be 'auto', 'baseline', 'x86-64-v3' or 'x86-64-v4'; got '", s, "'");
  return CpuVariant::kBaseline;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       int64_t iters, double eps,
                                                                       c10::string_view order, bool keep_iterates,
                                                                       c10::string_view precision) {
  switch (chosen_variant()) {
#if THREEG_X86_VARIANTS
    case CpuVariant::kV4:
      return cpu_x86_64_v4::forward(x, weight, iters, eps, order, keep_iterates, precision);
    case CpuVariant::kV3:
      return cpu_x86_64_v3::forward(x, weight, iters, eps, order, keep_iterates, precision);
#endif
    default:
      return cpu_baseline::forward(x, weight, iters, eps, order, keep_iterates, precision);
  }
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& out,
                                                const at::Tensor& A, const at::Tensor& tr,
                                                const at::Tensor& iterates, int64_t iters, c10::string_view order,
                                                c10::string_view precision) {
  switch (chosen_variant()) {
#if THREEG_X86_VARIANTS
    case CpuVariant::kV4:
      return cpu_x86_64_v4::backward(grad, x, weight, out, A, tr, iterates, iters, order, precision);
    case CpuVariant::kV3:
      return cpu_x86_64_v3::backward(grad, x, weight, out, A, tr, iterates, iters, order, precision);
#endif
    default:
      return cpu_baseline::backward(grad, x, weight, out, A, tr, iterates, iters, order, precision);
  }
}

}  // namespace

int64_t small_eigh_max() { return cpu_baseline::small_eigh_max(); }

std::vector<std::string> cpu_variants() {
  std::vector<std::string> names;
  for (int v = 0; v <= static_cast<int>(best_variant()); ++v) names.emplace_back(kVariantNames[v]);
  return names;
}

}  // namespace threeg

TORCH_LIBRARY_IMPL(threeg, CPU, m) {
  m.impl("cov_pool_ext_forward", &threeg::forward_cpu);
  m.impl("cov_pool_ext_backward", &threeg::backward_cpu);
}
