// CPU kernels of the "ext" backend: threeg::cov_pool_ext_forward / threeg::cov_pool_ext_backward.
//
// The spectral route, docs/math.md (15)-(20): one symmetric eigendecomposition A = U L U^T (LAPACK syevd)
// gives the K-step result Y_K = U p(L) U^T (15)-(16) and the exact gradient of the unrolled iteration (17),
// its divided differences computed by the pair recursion (18) without cancellation. The same function as the
// iteration (not the limit A^{1/2}): it matches reference.py for any K and for rank-deficient covariances.
//
// Per sample (V = U^T: syevd leaves U column-major, i.e. V row-major, in the saved slot):
//   forward:  Xc (1); P = Xc Xc^T, tr and A (1)-(2); syevd of A; eigenvalues refined through R = V Xc (20);
//             p(L) (16); Y = V^T (p(L) V); out = sqrt(tr) Y packed in order (6)-(8)
//   backward: dY_K (9) and <grad, out>; M = D o (V dY V^T) (17)-(18); <dA, A> and dA Xc (19) (dA formed first
//             when N > C); c and dX_w (13)-(14); dX, dw (14)
// Saved state when the iterates are kept, (21): per sample [V (C x C), L (C)], shape (B, C (C + 1)); empty:
// the backward recomputes the eigendecomposition from A.
//
// Samples run in parallel (at::parallel_for over the batch, samples handed out one at a time; each thread
// calls single-threaded BLAS/LAPACK on its own scratch). No N x N matrix is formed; the covariance, trace,
// normalisation, centring and the triangle pack/scatter are fused loops around the products.
#include "../cov_pool_ext.h"

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#if AT_BUILD_WITH_LAPACK()
#include <ATen/native/BatchLinearAlgebra.h>
#endif
#if AT_MKL_ENABLED()
extern "C" int MKL_Set_Num_Threads_Local(int nthreads);  // MKL service function (C interface), in libtorch_cpu
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace threeg {
namespace {

using at::Tensor;

// Xc = X_w - mu 1^T of sample b into xc (C x N, contiguous); x and weight may be strided.
template <typename scalar_t>
void centre(const Tensor& x, const scalar_t* w, int64_t w_stride, int64_t b, scalar_t* xc) {
  const int64_t c_n = x.size(1), n_n = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1), sn = x.stride(2);
  const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * sb;
  for (int64_t c = 0; c < c_n; ++c) {
    const scalar_t* row = xb + c * sc;
    scalar_t* out = xc + c * n_n;
    double sum = 0;
    for (int64_t n = 0; n < n_n; ++n) {
      const scalar_t v = w ? row[n * sn] * w[n * w_stride] : row[n * sn];
      out[n] = v;
      sum += v;
    }
    const scalar_t mu = static_cast<scalar_t>(sum / n_n);
    for (int64_t n = 0; n < n_n; ++n) out[n] -= mu;
  }
}

// The eigendecomposition of one symmetric C x C matrix `a` into slot = [V row-major (C x C), L (C)].
// A sample with a non-finite trace (NaN/Inf inputs) gets NaN, as the iteration would give.
template <typename scalar_t>
class Eigh {
 public:
  explicit Eigh(int64_t c) : c_(c) {
#if AT_BUILD_WITH_LAPACK()
    scalar_t work_size = 0, a = 0, l = 0;
    int iwork_size = 0, info = 0;
    at::native::lapackSyevd<scalar_t, scalar_t>('V', 'L', c, &a, c, &l, &work_size, -1, nullptr, 0, &iwork_size, -1,
                                                &info);
    work_.resize(std::max<int64_t>(1, static_cast<int64_t>(work_size)));
    iwork_.resize(std::max(1, iwork_size));
#endif
  }

  void operator()(const scalar_t* a, bool finite, scalar_t* slot) {
    const int64_t cc = c_ * c_;
    int info = finite ? 0 : -1;
    if (finite) {
#if AT_BUILD_WITH_LAPACK()
      std::copy(a, a + cc, slot);  // symmetric: row-major reads as column-major
      at::native::lapackSyevd<scalar_t, scalar_t>('V', 'L', c_, slot, c_, slot + cc, work_.data(),
                                                  static_cast<int>(work_.size()), nullptr, 0, iwork_.data(),
                                                  static_cast<int>(iwork_.size()), &info);
#else
      TORCH_CHECK(false, "threeg::cov_pool_ext on CPU needs a torch built with LAPACK; use backend='torch'");
#endif
    }
    if (info != 0) std::fill(slot, slot + cc + c_, std::numeric_limits<scalar_t>::quiet_NaN());
  }

 private:
  int64_t c_;
  std::vector<scalar_t> work_;
  std::vector<int> iwork_;
};

// The scalar recursion docs/math.md (16) on every eigenvalue: ys/zs[k C + i] = y_k, z_k (before step k + 1),
// ts[k C + i] = t_{k+1}; returns p(l_i) = y_K in p.
template <typename scalar_t>
void trajectories(const scalar_t* l, int64_t c, int64_t iters, scalar_t* ys, scalar_t* zs, scalar_t* ts,
                  scalar_t* p) {
  for (int64_t i = 0; i < c; ++i) {
    scalar_t y = l[i], z = 1;
    for (int64_t k = 0; k < iters; ++k) {
      const scalar_t t = (scalar_t(3) - z * y) * scalar_t(0.5);
      if (ys) {
        ys[k * c + i] = y;
        zs[k * c + i] = z;
        ts[k * c + i] = t;
      }
      y *= t;
      z = t * z;
    }
    p[i] = y;
  }
}

// The eigenvalues of A as Rayleigh quotients through the features, docs/math.md (20), with R = V Xc and
// `shift` = eps / tr: syevd's own eigenvalues are too coarse at eps / tr, where p amplifies their error by
// 1.5^K. The squared form is >= eps / tr and brings float32 back to the iteration's accuracy.
template <typename scalar_t>
void rayleigh_eigenvalues(const scalar_t* R, int64_t c, int64_t n, double tr_b, double shift, scalar_t* l) {
  for (int64_t i = 0; i < c; ++i) {
    double sq = 0;
    for (int64_t k = 0; k < n; ++k) sq += static_cast<double>(R[i * n + k]) * R[i * n + k];
    l[i] = static_cast<scalar_t>(sq / (n * tr_b) + shift);
  }
}

// Row i of D: dy[j] = p[l_i, l_j] for j <= i, by the pair recursion docs/math.md (18) with a = l_i, b = l_j.
template <typename scalar_t>
void divided_differences(int64_t i, int64_t c, int64_t iters, const scalar_t* ys, const scalar_t* zs,
                         const scalar_t* ts, scalar_t* __restrict__ dy, scalar_t* __restrict__ dz) {
  const int64_t m = i + 1;
  for (int64_t j = 0; j < m; ++j) {
    dy[j] = 1;
    dz[j] = 0;
  }
  for (int64_t k = 0; k < iters; ++k) {
    const scalar_t ya = ys[k * c + i], za = zs[k * c + i], ta = ts[k * c + i];
    const scalar_t* __restrict__ yb = ys + k * c;
    const scalar_t* __restrict__ zb = zs + k * c;
    const scalar_t* __restrict__ tb = ts + k * c;
    for (int64_t j = 0; j < m; ++j) {
      const scalar_t dt = scalar_t(-0.5) * (dz[j] * yb[j] + za * dy[j]);
      const scalar_t dy_next = dy[j] * tb[j] + ya * dt;
      dz[j] = dt * zb[j] + ta * dz[j];
      dy[j] = dy_next;
    }
  }
}

// Samples are handed out one at a time from a shared counter rather than in fixed halves: on a shared
// machine a thread that is descheduled leaves its samples to the others instead of holding up the op.
inline int64_t threads_for(int64_t b_n) { return std::max<int64_t>(1, std::min<int64_t>(b_n, at::get_num_threads())); }

// Each thread of the batch loop calls BLAS/LAPACK single-threaded: MKL's own threads on top of ours would
// oversubscribe the cores (and MKL's 2-thread kernels were erratic on a busy machine: docs/ext.md).
class SequentialBlas {
 public:
#if AT_MKL_ENABLED()
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local(1)) {}
  ~SequentialBlas() { MKL_Set_Num_Threads_Local(previous_); }

 private:
  int previous_;
#endif
};

// Calls f(i, j, flat index) over the vectorised triangle in its order, docs/math.md (7)-(8).
template <typename F>
inline void for_triangle(int64_t c, bool lower, F f) {
  int64_t idx = 0;
  for (int64_t i = 0; i < c; ++i) {
    const int64_t j0 = lower ? 0 : i, j1 = lower ? i + 1 : c;
    for (int64_t j = j0; j < j1; ++j) f(i, j, idx++);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(const Tensor& x, const std::optional<Tensor>& weight,
                                                       int64_t iters, double eps, c10::string_view order,
                                                       bool keep_iterates, c10::string_view precision) {
  const char* op = "threeg::cov_pool_ext_forward";
  check_forward_args(op, x, weight, iters, eps, precision, c10::kCPU);
  const bool lower = is_lower_order(op, order);
  // float32 eigenvectors' errors grow with the slope of the K-step polynomial (~1.5^K at small eigenvalues):
  // past 5 steps the spectral route is less accurate than the iteration it stands for (docs/math.md, "How
  // many steps"); the ext backend's Python layer runs the iteration there (threeg_kernels/backends/ext_impl.py).
  TORCH_CHECK(x.scalar_type() != at::kFloat || iters <= 5, op,
              ": float32 on CPU is supported for iters <= 5 (the spectral route's float32 error grows with K); "
              "got iters = ", iters, ". cov_pool(backend='ext') runs the iteration for larger K.");
  const int64_t b_n = x.size(0), c = x.size(1), n = x.size(2);
  const bool weighted = weight.has_value() && weight->defined();
  Tensor out = at::empty({b_n, triangle_size(c)}, x.options());
  Tensor A = at::empty({b_n, c, c}, x.options());
  Tensor tr = at::empty({b_n}, x.options());
  Tensor iterates = keep_iterates ? at::empty({b_n, c * (c + 1)}, x.options()) : at::empty({0}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_forward", [&] {
    const scalar_t* w = weighted ? weight->const_data_ptr<scalar_t>() : nullptr;
    const int64_t w_sb = weighted ? weight->stride(0) : 0, w_sn = weighted ? weight->stride(1) : 0;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads_for(b_n), 1, [&](int64_t, int64_t) {
      at::AutoDispatchBelowADInplaceOrView guard;
      SequentialBlas sequential_blas;
      Tensor xc = at::empty({c, n}, x.options());
      Tensor prod = at::empty({c, c}, x.options());  // Xc Xc^T, then Y
      Tensor proj = at::empty({c, n}, x.options());  // V Xc
      Tensor scaled = at::empty({c, c}, x.options());  // p(L) V
      Tensor own_slot = keep_iterates ? Tensor() : at::empty({c * (c + 1)}, x.options());
      std::vector<scalar_t> p(c);
      Eigh<scalar_t> eigh(c);
      for (int64_t b = next++; b < b_n; b = next++) {
        centre<scalar_t>(x, w ? w + b * w_sb : nullptr, w_sn, b, xc.mutable_data_ptr<scalar_t>());
        at::mm_out(prod, xc, xc.t());

        const scalar_t* P = prod.const_data_ptr<scalar_t>();
        double trace = 0;
        for (int64_t i = 0; i < c; ++i) trace += P[i * (c + 1)];
        const double tr_b = trace / n + c * eps;
        tr.mutable_data_ptr<scalar_t>()[b] = static_cast<scalar_t>(tr_b);
        const scalar_t scale = static_cast<scalar_t>(1.0 / (n * tr_b)), shift = static_cast<scalar_t>(eps / tr_b);
        scalar_t* Ab = A.mutable_data_ptr<scalar_t>() + b * c * c;
        for (int64_t i = 0; i < c * c; ++i) Ab[i] = P[i] * scale;
        for (int64_t i = 0; i < c; ++i) Ab[i * (c + 1)] += shift;

        Tensor slot = keep_iterates ? iterates[b] : own_slot;
        scalar_t* V = slot.mutable_data_ptr<scalar_t>();
        eigh(Ab, std::isfinite(tr_b), V);
        Tensor Vt = slot.narrow(0, 0, c * c).view({c, c});
        at::mm_out(proj, Vt, xc);
        rayleigh_eigenvalues<scalar_t>(proj.const_data_ptr<scalar_t>(), c, n, tr_b, eps / tr_b, V + c * c);
        trajectories<scalar_t>(V + c * c, c, iters, nullptr, nullptr, nullptr, p.data());

        scalar_t* W = scaled.mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < c; ++i)
          for (int64_t j = 0; j < c; ++j) W[i * c + j] = p[i] * V[i * c + j];
        at::mm_out(prod, Vt.t(), scaled);  // Y = V^T p(L) V

        const scalar_t* Y = prod.const_data_ptr<scalar_t>();
        const scalar_t root = static_cast<scalar_t>(std::sqrt(tr_b));
        scalar_t* o = out.mutable_data_ptr<scalar_t>() + b * triangle_size(c);
        for_triangle(c, lower, [&](int64_t i, int64_t j, int64_t idx) { o[idx] = root * Y[i * c + j]; });
      }
    });
  });
  return {out, A, tr, iterates};
}

std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad_in, const Tensor& x, const std::optional<Tensor>& weight,
                                        const Tensor& out_in, const Tensor& A_in, const Tensor& tr_in,
                                        const Tensor& iterates, int64_t iters, c10::string_view order,
                                        c10::string_view precision) {
  const char* op = "threeg::cov_pool_ext_backward";
  const int64_t b_n = x.size(0), c = x.size(1), n = x.size(2);
  check_backward_args(op, grad_in, x, weight, out_in, A_in, tr_in, iterates, {b_n, c * (c + 1)}, iters, precision,
                      c10::kCPU);
  const bool lower = is_lower_order(op, order);
  const bool weighted = weight.has_value() && weight->defined();
  const bool saved = iterates.numel() != 0;
  const Tensor grad = grad_in.contiguous(), out = out_in.contiguous(), A = A_in.contiguous(), tr = tr_in.contiguous();
  const Tensor slots = saved ? iterates.contiguous() : iterates;
  Tensor dx = at::empty_like(x);
  Tensor dw = weighted ? at::empty_like(*weight) : at::empty({0}, x.options());
  // Apply dA to Xc without forming dA while that is cheaper (N <= C: 3 C^2 N flops against 2 C^3 + C^2 N).
  const bool via_eigenbasis = n <= c;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_backward", [&] {
    const scalar_t* w = weighted ? weight->const_data_ptr<scalar_t>() : nullptr;
    const int64_t w_sb = weighted ? weight->stride(0) : 0, w_sn = weighted ? weight->stride(1) : 0;
    const int64_t tri = triangle_size(c);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads_for(b_n), 1, [&](int64_t, int64_t) {
      at::AutoDispatchBelowADInplaceOrView guard;
      SequentialBlas sequential_blas;
      auto opts = x.options();
      Tensor xc = at::empty({c, n}, opts);
      Tensor dY = at::empty({c, c}, opts);  // then dA when !via_eigenbasis
      Tensor Q = at::empty({c, c}, opts);
      Tensor M = at::empty({c, c}, opts);
      // V Xc: applies dA without forming it, and refines recomputed eigenvalues as the forward did.
      const bool project = via_eigenbasis || !saved;
      Tensor R1 = at::empty({c, n}, opts), R2 = project ? at::empty({c, n}, opts) : Tensor();
      Tensor own_slot = saved ? Tensor() : at::empty({c * (c + 1)}, opts);
      std::vector<scalar_t> traj(3 * iters * c), p(c), ddy(c), ddz(c);
      std::vector<double> dw_acc(n);
      std::unique_ptr<Eigh<scalar_t>> eigh;
      if (!saved) eigh = std::make_unique<Eigh<scalar_t>>(c);
      const scalar_t* sd = saved ? slots.const_data_ptr<scalar_t>() : nullptr;
      for (int64_t b = next++; b < b_n; b = next++) {
        const double tr_b = tr.const_data_ptr<scalar_t>()[b];
        Tensor slot = saved ? slots[b] : own_slot;
        const scalar_t* l = (saved ? sd + b * c * (c + 1) : own_slot.const_data_ptr<scalar_t>()) + c * c;
        Tensor V = slot.narrow(0, 0, c * c).view({c, c});
        centre<scalar_t>(x, w ? w + b * w_sb : nullptr, w_sn, b, xc.mutable_data_ptr<scalar_t>());
        if (!saved) {
          (*eigh)(A.const_data_ptr<scalar_t>() + b * c * c, std::isfinite(tr_b), own_slot.mutable_data_ptr<scalar_t>());
        }
        if (project) at::mm_out(R2, V, xc);  // U^T Xc
        if (!saved) {
          // eps / tr from trace(A) = 1 = |Xc|^2 / (N tr) + C eps / tr (the backward has no eps): its error,
          // ~ eps_mach / C from the rounding of tr, is far below syevd's.
          const scalar_t* xcp = xc.const_data_ptr<scalar_t>();
          double sq = 0;
          for (int64_t k = 0; k < c * n; ++k) sq += static_cast<double>(xcp[k]) * xcp[k];
          const double shift = std::max(0.0, (1.0 - sq / (n * tr_b)) / c);
          rayleigh_eigenvalues<scalar_t>(R2.const_data_ptr<scalar_t>(), c, n, tr_b, shift,
                                         own_slot.mutable_data_ptr<scalar_t>() + c * c);
        }

        // dY_K = sqrt(tr) sym(G_S), docs/math.md (9), and <grad, out> on the way.
        const scalar_t* g = grad.const_data_ptr<scalar_t>() + b * tri;
        const scalar_t* o = out.const_data_ptr<scalar_t>() + b * tri;
        scalar_t* dy = dY.mutable_data_ptr<scalar_t>();
        const scalar_t root = static_cast<scalar_t>(std::sqrt(tr_b)), half_root = root * scalar_t(0.5);
        double grad_out = 0;
        for_triangle(c, lower, [&](int64_t i, int64_t j, int64_t idx) {
          grad_out += static_cast<double>(g[idx]) * o[idx];
          if (i == j) {
            dy[i * c + i] = root * g[idx];
          } else {
            dy[i * c + j] = dy[j * c + i] = half_root * g[idx];
          }
        });

        at::mm_out(Q, dY, V.t());
        at::mm_out(M, V, Q);  // U^T dY U

        scalar_t* ys = traj.data();
        scalar_t* zs = ys + iters * c;
        scalar_t* ts = zs + iters * c;
        trajectories<scalar_t>(l, c, iters, ys, zs, ts, p.data());
        scalar_t* m = M.mutable_data_ptr<scalar_t>();
        double dA_dot_A = 0;
        for (int64_t i = 0; i < c; ++i) {
          divided_differences<scalar_t>(i, c, iters, ys, zs, ts, ddy.data(), ddz.data());
          for (int64_t j = 0; j < i; ++j) {
            m[i * c + j] *= ddy[j];
            m[j * c + i] *= ddy[j];
          }
          m[i * c + i] *= ddy[i];
          dA_dot_A += static_cast<double>(m[i * c + i]) * l[i];
        }
        const double coef = dA_dot_A - 0.5 * grad_out;

        if (via_eigenbasis) {
          at::mm_out(R1, M, R2);
          at::mm_out(R2, V.t(), R1);  // dA Xc
        } else {
          at::mm_out(Q, M, V);
          at::mm_out(dY, V.t(), Q);  // dA
          at::mm_out(R1, dY, xc);
        }
        const Tensor& P = via_eigenbasis ? R2 : R1;

        const scalar_t s2 = static_cast<scalar_t>(2.0 / (n * tr_b)), s2coef = static_cast<scalar_t>(coef) * s2;
        const scalar_t* pp = P.const_data_ptr<scalar_t>();
        const scalar_t* xcp = xc.const_data_ptr<scalar_t>();
        const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * x.stride(0);
        scalar_t* dxb = dx.mutable_data_ptr<scalar_t>() + b * dx.stride(0);
        const scalar_t* wb = w ? w + b * w_sb : nullptr;
        if (wb) std::fill(dw_acc.begin(), dw_acc.end(), 0.0);
        for (int64_t ci = 0; ci < c; ++ci) {
          // The centring's own backward, docs/math.md (14): subtract the row mean of dXc. It is zero in exact
          // arithmetic (Xc 1 = 0) but not in floating point when the features' mean is large against their
          // spread, where leaving it out costs digits that autograd through the reference keeps.
          double row_sum = 0;
          for (int64_t ni = 0; ni < n; ++ni) row_sum += s2 * pp[ci * n + ni] - s2coef * xcp[ci * n + ni];
          const scalar_t row_mean = static_cast<scalar_t>(row_sum / n);
          for (int64_t ni = 0; ni < n; ++ni) {
            const scalar_t dxw = s2 * pp[ci * n + ni] - s2coef * xcp[ci * n + ni] - row_mean;
            scalar_t* dst = dxb + ci * dx.stride(1) + ni * dx.stride(2);
            if (wb) {
              *dst = dxw * wb[ni * w_sn];
              dw_acc[ni] += static_cast<double>(dxw) * xb[ci * x.stride(1) + ni * x.stride(2)];
            } else {
              *dst = dxw;
            }
          }
        }
        if (wb) {
          scalar_t* dwb = dw.mutable_data_ptr<scalar_t>() + b * dw.stride(0);
          for (int64_t ni = 0; ni < n; ++ni) dwb[ni * dw.stride(1)] = static_cast<scalar_t>(dw_acc[ni]);
        }
      }
    });
  });
  return {dx, dw};
}

}  // namespace
}  // namespace threeg

TORCH_LIBRARY_IMPL(threeg, CPU, m) {
  m.impl("cov_pool_ext_forward", &threeg::forward_cpu);
  m.impl("cov_pool_ext_backward", &threeg::backward_cpu);
}
