// Shared by the device files of the "ext" backend: the argument checks of both ops and small
// helpers. Schemas: csrc/ops.cpp. Math: docs/math.md, (15)-(20) for the CPU kernels (spectral route),
// (1)-(14) for the CUDA kernels (Newton-Schulz iteration).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace threeg {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

inline int64_t triangle_size(int64_t c) { return c * (c + 1) / 2; }

// The largest matrix the CPU kernels eigendecompose with their own solver rather than LAPACK's syevd, in float32
// (float64 = false) or float64, for the variant the ops call now (csrc/cpu/small_eigh.h; docs/ext.md, "Eigensolver").
int64_t small_eigh_max(bool float64);

// The instruction-set variants of the CPU kernels that this build has and this CPU runs, best last
// (csrc/cpu/cpu_variants.h); THREEG_EXT_ISA picks one of them, the best by default.
std::vector<std::string> cpu_variants();

// The variant the ops call now: THREEG_EXT_ISA's, or the best (raises as the ops do for a value they refuse).
std::string cpu_variant();

// x: (B, C, N) float32/float64 with N >= 2; weight: (B, N) of x's dtype and device, or None.
inline void check_pool_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              c10::DeviceType device) {
  TORCH_CHECK(x.defined(), op, ": x must be a tensor");
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, C, N); got ", x.dim(), "-d ", describe(x));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 (cov_pool casts narrower types up); got ", describe(x));
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", device, "; got ", describe(x));
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 2, op, ": x must have C >= 1 and N >= 2; got ", describe(x));
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == x.size(2), op,
                ": weight must have shape (B, N) = (", x.size(0), ", ", x.size(2), ") to match x; got ",
                describe(w));
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op,
                ": weight must have the dtype and device of x (", x.scalar_type(), ", ", x.device(), "); got ",
                describe(w));
  }
}

// The supported Newton-Schulz step counts (threeg_kernels/_validate.py MAX_ITERS; docs/math.md).
constexpr int64_t kMaxIters = 20;

// The triangle order of the op contract ('3g' or 'mpncov'); returns true for '3g' (the lower triangle).
inline bool is_lower_order(const char* op, c10::string_view order) {
  TORCH_CHECK(order == "3g" || order == "mpncov", op, ": order must be '3g' or 'mpncov'; got '", order, "'");
  return order == "3g";
}

// The ext kernels compute their products in the input dtype (fp32-accurate): 'ieee' only.
inline void check_precision(const char* op, c10::string_view precision) {
  TORCH_CHECK(precision == "ieee", op, ": precision must be 'ieee' (the only mode of the ext backend); got '",
              precision, "'");
}

inline void check_forward_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               int64_t iters, double eps, c10::string_view precision, c10::DeviceType device) {
  check_pool_inputs(op, x, weight, device);
  TORCH_CHECK(iters >= 1 && iters <= kMaxIters, op, ": iters must be in [1, ", kMaxIters, "]; got ", iters);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0; got ", eps);
  check_precision(op, precision);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                        const at::Tensor& x) {
  TORCH_CHECK(t.defined() && t.sizes() == shape, op, ": ", name, " must have shape ", shape, "; got ",
              t.defined() ? describe(t) : std::string("an undefined tensor"));
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name,
              " must have the dtype and device of x (", x.scalar_type(), ", ", x.device(), "); got ", describe(t));
}

// The saved tensors of the backward: A of the shape the forward gave it (`A_shape`: (B, C, C), or (0) where the
// backward never reads it), `iterates` empty (recompute) or of the backend's shape.
inline void check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const at::Tensor& out, const at::Tensor& A,
                                at::IntArrayRef A_shape, const at::Tensor& tr, const at::Tensor& iterates,
                                at::IntArrayRef iterates_shape, int64_t iters, c10::string_view precision,
                                c10::DeviceType device) {
  check_pool_inputs(op, x, weight, device);
  TORCH_CHECK(iters >= 1 && iters <= kMaxIters, op, ": iters must be in [1, ", kMaxIters, "]; got ", iters);
  check_precision(op, precision);
  const int64_t b = x.size(0), c = x.size(1);
  check_shape(op, "grad", grad, {b, triangle_size(c)}, x);
  check_shape(op, "out", out, {b, triangle_size(c)}, x);
  check_shape(op, "A", A, A_shape, x);
  check_shape(op, "tr", tr, {b}, x);
  if (iterates.numel() != 0) {
    check_shape(op, "iterates", iterates, iterates_shape, x);
  } else {
    TORCH_CHECK(iterates.scalar_type() == x.scalar_type() && iterates.device() == x.device(), op,
                ": iterates must have the dtype and device of x; got ", describe(iterates));
  }
}

}  // namespace threeg
