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

// A variant's entry points (cpu_variants.h), by name.
struct Variant {
  const char* name;
  decltype(&cpu_baseline::forward) forward;
  decltype(&cpu_baseline::backward) backward;
  decltype(&cpu_baseline::small_eigh_max) small_eigh_max;
};

// Every variant this build has, in order of instruction set (each runs where the next one's CPU does).
constexpr Variant kVariants[] = {
    {"baseline", &cpu_baseline::forward, &cpu_baseline::backward, &cpu_baseline::small_eigh_max},
#if THREEG_X86_VARIANTS
    {"x86-64-v3", &cpu_x86_64_v3::forward, &cpu_x86_64_v3::backward, &cpu_x86_64_v3::small_eigh_max},
    {"x86-64-v4", &cpu_x86_64_v4::forward, &cpu_x86_64_v4::backward, &cpu_x86_64_v4::small_eigh_max},
#endif
};
constexpr int kBuilt = static_cast<int>(sizeof(kVariants) / sizeof(kVariants[0]));

// How many of kVariants this CPU runs (asked once): the best one is the last of them.
int runnable() {
#if THREEG_X86_VARIANTS
  static const int count = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 3;
    if (__builtin_cpu_supports("x86-64-v3")) return 2;
    return 1;
  }();
  return count;
#else
  return kBuilt;
#endif
}

// The variant the ops call: THREEG_EXT_ISA, read at every call (a getenv: no measurable cost) so that a test can run
// each variant, or the best this CPU runs.
const Variant& chosen() {
  const char* env = std::getenv("THREEG_EXT_ISA");
  const std::string s = env ? env : "";
  if (s.empty() || s == "auto") return kVariants[runnable() - 1];
  for (int v = 0; v < runnable(); ++v) {
    if (s == kVariants[v].name) return kVariants[v];
  }
  TORCH_CHECK(s != "baseline" && s != "x86-64-v3" && s != "x86-64-v4",
              "THREEG_EXT_ISA='", s, "' needs a CPU with ", s, " and a build that compiled it; this one runs up to '",
              kVariants[runnable() - 1].name, "'");
  TORCH_CHECK(false, "THREEG_EXT_ISA must be 'auto', 'baseline', 'x86-64-v3' or 'x86-64-v4'; got '", s, "'");
  return kVariants[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x,
                                                                       const std::optional<at::Tensor>& weight,
                                                                       int64_t iters, double eps,
                                                                       c10::string_view order, bool keep_iterates,
                                                                       c10::string_view precision) {
  return chosen().forward(x, weight, iters, eps, order, keep_iterates, precision);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& out,
                                                const at::Tensor& A, const at::Tensor& tr,
                                                const at::Tensor& iterates, int64_t iters, c10::string_view order,
                                                c10::string_view precision) {
  return chosen().backward(grad, x, weight, out, A, tr, iterates, iters, order, precision);
}

}  // namespace

int64_t small_eigh_max(bool float64) { return chosen().small_eigh_max(float64); }

std::vector<std::string> cpu_variants() {
  std::vector<std::string> names;
  for (int v = 0; v < runnable(); ++v) names.emplace_back(kVariants[v].name);
  return names;
}

std::string cpu_variant() { return chosen().name; }

}  // namespace threeg

TORCH_LIBRARY_IMPL(threeg, CPU, m) {
  m.impl("cov_pool_ext_forward", &threeg::forward_cpu);
  m.impl("cov_pool_ext_backward", &threeg::backward_cpu);
}
