// CUDA kernels of the "ext" backend: threeg::cov_pool_ext_forward / threeg::cov_pool_ext_backward.
//
// The coupled Newton-Schulz iteration and its plain reverse sweep, docs/math.md (1)-(10), (12)-(14): matrix
// products throughout, rather than the batched eigendecomposition of the CPU kernels' spectral route (a design
// choice, not measured on a GPU). The C x C products are batched cuBLAS GEMMs (at::bmm, at::baddbmm); the
// elementwise work between them runs in the fused kernels below:
//   forward:  centre (1); normalise (1)-(2); ns_first (5); ns_t, the epilogue of Z_{k-1} Y_{k-1} (3); pack (6)-(8)
//   backward: scatter, dY_K = sqrt(tr) G_S; the reverse steps (10) and step 1 as autograd runs them through the
//             forward's products, transposes included (the symmetric sweep (11) assumes the float iterates commute
//             and loses accuracy geometrically with K); symmetrise, sym(dA); coef, c of (13); finish (14)
// Saved state when the iterates are kept, (21): (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K, laid out
// (K - 1, 3, B, C, C); empty: the backward re-runs the forward products from A.
#include "../cov_pool_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace threeg {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // valid in thread 0
}

// Flat index in `out` of entry (i, j) of the vectorised triangle, docs/math.md (8) ('3g': i >= j;
// 'mpncov': i <= j).
__device__ __forceinline__ int64_t packed_index(int64_t i, int64_t j, int64_t c, bool lower) {
  return lower ? i * (i + 1) / 2 + j : i * c - i * (i - 1) / 2 + (j - i);
}

// One warp per row (b, c): xc[b, c, :] = x * w - mean over n, centred twice: (x * w - mu) - r with r the mean of
// x * w - mu, what the float mean mu misses (~ eps_mach |mu|). dXc = D Xc (docs/math.md (14)) then has row means
// D r, so the twice-centred xc applies the centring's own backward, dX_w = dXc - (dXc 1 / N) 1^T, which matters
// when the features' mean is large against their spread. x (B, C, N) and w (B, N) strided; xc contiguous.
template <typename scalar_t>
__global__ void centre_kernel(const scalar_t* __restrict__ x, int64_t xsb, int64_t xsc, int64_t xsn,
                              const scalar_t* __restrict__ w, int64_t wsb, int64_t wsn, int64_t b_n, int64_t c_n,
                              int64_t n_n, scalar_t* __restrict__ xc) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= b_n * c_n) return;
  const int64_t b = row / c_n, c = row % c_n;
  const scalar_t* xr = x + b * xsb + c * xsc;
  const scalar_t* wr = w ? w + b * wsb : nullptr;
  scalar_t* out = xc + row * n_n;
  scalar_t sum = 0;
  for (int64_t n = lane; n < n_n; n += 32) {
    const scalar_t v = wr ? xr[n * xsn] * wr[n * wsn] : xr[n * xsn];
    out[n] = v;
    sum += v;
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const scalar_t mu = sum / scalar_t(n_n);
  scalar_t rest = 0;
  for (int64_t n = lane; n < n_n; n += 32) {
    out[n] -= mu;
    rest += out[n];
  }
  for (int offset = 16; offset > 0; offset /= 2) rest += __shfl_xor_sync(0xffffffffu, rest, offset);
  const scalar_t r = rest / scalar_t(n_n);
  for (int64_t n = lane; n < n_n; n += 32) out[n] -= r;
}

// One block per sample, docs/math.md (1)-(2): tr = trace(P) / N + C eps, then P <- (P / N + eps I) / tr in
// place (= A).
template <typename scalar_t>
__global__ void normalise_kernel(scalar_t* __restrict__ P, scalar_t* __restrict__ tr, int64_t c_n, int64_t n_n,
                                 double eps) {
  scalar_t* Pb = P + blockIdx.x * c_n * c_n;
  scalar_t diag = 0;
  for (int64_t i = threadIdx.x; i < c_n; i += blockDim.x) diag += Pb[i * (c_n + 1)];
  __shared__ scalar_t tr_b;
  diag = block_sum(diag);
  if (threadIdx.x == 0) {
    tr_b = diag / scalar_t(n_n) + scalar_t(c_n * eps);
    tr[blockIdx.x] = tr_b;
  }
  __syncthreads();
  const scalar_t scale = scalar_t(1) / (scalar_t(n_n) * tr_b), shift = scalar_t(eps) / tr_b;
  for (int64_t e = threadIdx.x; e < c_n * c_n; e += blockDim.x) {
    const int64_t i = e / c_n, j = e % c_n;
    Pb[e] = Pb[e] * scale + (i == j ? shift : scalar_t(0));
  }
}

// Step 1, docs/math.md (5): Y_1 from A and AA, and Z_1 (only when K > 1).
template <typename scalar_t>
__global__ void ns_first_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ AA,
                                scalar_t* __restrict__ Y, scalar_t* __restrict__ Z, int64_t c_n, int64_t total) {
  GRID_STRIDE(e, total) {
    const int64_t r = e % (c_n * c_n);
    const scalar_t a = A[e];
    Y[e] = scalar_t(1.5) * a - scalar_t(0.5) * AA[e];
    if (Z) Z[e] = (r / c_n == r % c_n ? scalar_t(1.5) : scalar_t(0)) - scalar_t(0.5) * a;
  }
}

// The epilogue of Z Y: T of docs/math.md (3), in place.
template <typename scalar_t>
__global__ void ns_t_kernel(scalar_t* __restrict__ T, int64_t c_n, int64_t total) {
  GRID_STRIDE(e, total) {
    const int64_t r = e % (c_n * c_n);
    T[e] = (r / c_n == r % c_n ? scalar_t(1.5) : scalar_t(0)) - scalar_t(0.5) * T[e];
  }
}

// out[b, idx(i, j)] = sqrt(tr_b) Y[b, i, j] over the triangle.
template <typename scalar_t>
__global__ void pack_kernel(const scalar_t* __restrict__ Y, const scalar_t* __restrict__ tr,
                            scalar_t* __restrict__ out, int64_t c_n, bool lower, int64_t total) {
  const int64_t tri = c_n * (c_n + 1) / 2;
  GRID_STRIDE(e, total) {
    const int64_t b = e / (c_n * c_n), r = e % (c_n * c_n), i = r / c_n, j = r % c_n;
    if (lower ? j <= i : j >= i) out[b * tri + packed_index(i, j, c_n, lower)] = sqrt(tr[b]) * Y[e];
  }
}

// dY[b, i, j] = sqrt(tr_b) G_S: the incoming gradient at the places of the order's triangle ('3g': i >= j,
// 'mpncov': i <= j), 0 elsewhere, as autograd gives it through the pack (not the sym(G_S) of docs/math.md (9),
// equal only in exact arithmetic: the reverse sweep starts from it as it is).
template <typename scalar_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ tr,
                               scalar_t* __restrict__ dY, int64_t c_n, bool lower, int64_t total) {
  const int64_t tri = c_n * (c_n + 1) / 2;
  GRID_STRIDE(e, total) {
    const int64_t b = e / (c_n * c_n), r = e % (c_n * c_n), i = r / c_n, j = r % c_n;
    const bool in_triangle = lower ? j <= i : i <= j;
    dY[e] = in_triangle ? sqrt(tr[b]) * grad[b * tri + packed_index(i, j, c_n, lower)] : scalar_t(0);
  }
}

// out = (M + M^T) / 2.
template <typename scalar_t>
__global__ void symmetrise_kernel(const scalar_t* __restrict__ M, scalar_t* __restrict__ out, int64_t c_n,
                                  int64_t total) {
  GRID_STRIDE(e, total) {
    const int64_t b = e / (c_n * c_n), r = e % (c_n * c_n), i = r / c_n, j = r % c_n;
    out[e] = scalar_t(0.5) * (M[e] + M[b * c_n * c_n + j * c_n + i]);
  }
}

// One block per sample: coef_b = c of docs/math.md (13).
template <typename scalar_t>
__global__ void coef_kernel(const scalar_t* __restrict__ dA, const scalar_t* __restrict__ A,
                            const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                            scalar_t* __restrict__ coef, int64_t c_n) {
  const int64_t cc = c_n * c_n, tri = c_n * (c_n + 1) / 2, b = blockIdx.x;
  scalar_t v = 0;
  for (int64_t e = threadIdx.x; e < cc; e += blockDim.x) v += dA[b * cc + e] * A[b * cc + e];
  for (int64_t e = threadIdx.x; e < tri; e += blockDim.x) v -= scalar_t(0.5) * grad[b * tri + e] * out[b * tri + e];
  v = block_sum(v);
  if (threadIdx.x == 0) coef[b] = v;
}

// One thread per (b, n), looping over c (neighbouring threads read neighbouring n): docs/math.md (14) with
// P = sym(dA) Xc and xc centred twice (centre_kernel).
template <typename scalar_t>
__global__ void finish_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ xc,
                              const scalar_t* __restrict__ coef, const scalar_t* __restrict__ tr,
                              const scalar_t* __restrict__ x, int64_t xsb, int64_t xsc, int64_t xsn,
                              const scalar_t* __restrict__ w, int64_t wsb, int64_t wsn, scalar_t* __restrict__ dx,
                              int64_t dsb, int64_t dsc, int64_t dsn, scalar_t* __restrict__ dw, int64_t dwsb,
                              int64_t dwsn, int64_t b_n, int64_t c_n, int64_t n_n) {
  GRID_STRIDE(e, b_n * n_n) {
    const int64_t b = e / n_n, n = e % n_n;
    const scalar_t s2 = scalar_t(2) / (scalar_t(n_n) * tr[b]), s2coef = s2 * coef[b];
    const scalar_t wn = w ? w[b * wsb + n * wsn] : scalar_t(1);
    scalar_t acc = 0;
    for (int64_t c = 0; c < c_n; ++c) {
      const int64_t k = (b * c_n + c) * n_n + n;
      const scalar_t dxw = s2 * P[k] - s2coef * xc[k];
      dx[b * dsb + c * dsc + n * dsn] = dxw * wn;
      if (w) acc += dxw * x[b * xsb + c * xsc + n * xsn];
    }
    if (w) dw[b * dwsb + n * dwsn] = acc;
  }
}

template <typename scalar_t>
Tensor centred(const Tensor& x, const std::optional<Tensor>& weight, cudaStream_t stream) {
  const int64_t b_n = x.size(0), c_n = x.size(1), n_n = x.size(2);
  Tensor xc = at::empty({b_n, c_n, n_n}, x.options());
  const bool weighted = weight.has_value() && weight->defined();
  const int64_t rows = b_n * c_n;
  centre_kernel<scalar_t><<<static_cast<int>((rows * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
      weighted ? weight->const_data_ptr<scalar_t>() : nullptr, weighted ? weight->stride(0) : 0,
      weighted ? weight->stride(1) : 0, b_n, c_n, n_n, xc.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return xc;
}

// Y_K from A; with `kept` (K - 1, 3, B, C, C) defined, (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K written into it.
template <typename scalar_t>
Tensor newton_schulz(const Tensor& A, int64_t iters, const Tensor& kept, cudaStream_t stream) {
  const int64_t c_n = A.size(1), total = A.numel();
  const bool keep = kept.defined();
  auto slot = [&](int64_t k, int64_t j) { return keep && k < iters - 1 ? kept[k][j] : at::empty_like(A); };
  Tensor AA = at::bmm(A, A);
  Tensor Y = slot(0, 0);
  Tensor Z = iters > 1 ? slot(0, 1) : Tensor();
  ns_first_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
      A.const_data_ptr<scalar_t>(), AA.const_data_ptr<scalar_t>(), Y.mutable_data_ptr<scalar_t>(),
      Z.defined() ? Z.mutable_data_ptr<scalar_t>() : nullptr, c_n, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t k = 1; k < iters; ++k) {
    Tensor T = keep ? kept[k - 1][2] : AA;  // AA is free after step 1
    at::bmm_out(T, Z, Y);
    ns_t_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(T.mutable_data_ptr<scalar_t>(), c_n, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (k + 1 < iters) {
      Tensor Z_next = slot(k, 1);
      Z = at::bmm_out(Z_next, T, Z);
    }
    Tensor Y_next = slot(k, 0);
    Y = at::bmm_out(Y_next, Y, T);
  }
  return Y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cuda(const Tensor& x, const std::optional<Tensor>& weight,
                                                        int64_t iters, double eps, c10::string_view order,
                                                        bool keep_iterates, c10::string_view precision) {
  check_forward_args("threeg::cov_pool_ext_forward", x, weight, iters, eps, precision, c10::kCUDA);
  const bool lower = is_lower_order("threeg::cov_pool_ext_forward", order);
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t b_n = x.size(0), c_n = x.size(1), n_n = x.size(2);
  Tensor out = at::empty({b_n, triangle_size(c_n)}, x.options());
  Tensor tr = at::empty({b_n}, x.options());
  Tensor iterates = keep_iterates ? at::empty({iters - 1, 3, b_n, c_n, c_n}, x.options()) : at::empty({0}, x.options());
  Tensor A;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_forward", [&] {
    Tensor xc = centred<scalar_t>(x, weight, stream);
    A = at::bmm(xc, xc.transpose(1, 2));
    normalise_kernel<scalar_t><<<static_cast<int>(b_n), kThreads, 0, stream>>>(
        A.mutable_data_ptr<scalar_t>(), tr.mutable_data_ptr<scalar_t>(), c_n, n_n, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor Y = newton_schulz<scalar_t>(A, iters, keep_iterates ? iterates : Tensor(), stream);
    pack_kernel<scalar_t><<<blocks_for(Y.numel()), kThreads, 0, stream>>>(
        Y.const_data_ptr<scalar_t>(), tr.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), c_n, lower,
        Y.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, A, tr, iterates};
}

std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad_in, const Tensor& x, const std::optional<Tensor>& weight,
                                         const Tensor& out_in, const Tensor& A_in, const Tensor& tr_in,
                                         const Tensor& iterates_in, int64_t iters, c10::string_view order,
                                         c10::string_view precision) {
  const int64_t b_n = x.size(0), c_n = x.size(1), n_n = x.size(2);
  check_backward_args("threeg::cov_pool_ext_backward", grad_in, x, weight, out_in, A_in, tr_in, iterates_in,
                      {iters - 1, 3, b_n, c_n, c_n}, iters, precision, c10::kCUDA);
  const bool lower = is_lower_order("threeg::cov_pool_ext_backward", order);
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor grad = grad_in.contiguous(), out = out_in.contiguous(), A = A_in.contiguous(), tr = tr_in.contiguous();
  const bool weighted = weight.has_value() && weight->defined();
  Tensor dx = at::empty_like(x);
  Tensor dw = weighted ? at::empty_like(*weight) : at::empty({0}, x.options());
  const int64_t total = A.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_backward", [&] {
    Tensor kept = iterates_in;
    if (iters > 1 && kept.numel() == 0) {
      kept = at::empty({iters - 1, 3, b_n, c_n, c_n}, x.options());
      newton_schulz<scalar_t>(A, iters, kept, stream);
    } else if (iters > 1) {
      kept = kept.contiguous();
    }
    Tensor dY = at::empty_like(A);
    scatter_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), tr.const_data_ptr<scalar_t>(), dY.mutable_data_ptr<scalar_t>(), c_n, lower,
        total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto t = [](const Tensor& m) { return m.transpose(1, 2); };
    // The plain reverse step (10), dZ_K = 0:
    //   dT = Y^T dY + dZ Z^T,  dY' = dY T^T - 0.5 Z^T dT,  dZ' = T^T dZ - 0.5 dT Y^T.
    Tensor dZ;
    for (int64_t k = iters - 1; k >= 1; --k) {
      const Tensor Yp = kept[k - 1][0], Zp = kept[k - 1][1], T = kept[k - 1][2];
      Tensor dT = at::bmm(t(Yp), dY);
      if (dZ.defined()) dT.baddbmm_(dZ, t(Zp));
      Tensor dZ_next =
          dZ.defined() ? at::baddbmm(at::bmm(t(T), dZ), dT, t(Yp), 1, -0.5) : at::bmm(dT, t(Yp)).mul_(-0.5);
      dY = at::baddbmm(at::bmm(dY, t(T)), t(Zp), dT, 1, -0.5);
      dZ = dZ_next;
    }
    // Step 1, docs/math.md (5): Y_1 = 1.5 A - 0.5 A A, Z_1 = 1.5 I - 0.5 A; then sym(dA), all that reaches dX
    // ((13) reads <dA, A>, (14) dSigma + dSigma^T).
    Tensor dA = at::baddbmm(dY, dY, t(A), 1.5, -0.5).baddbmm_(t(A), dY, 1, -0.5);
    if (dZ.defined()) dA.add_(dZ, -0.5);
    Tensor dA_sym = at::empty_like(A);
    symmetrise_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        dA.const_data_ptr<scalar_t>(), dA_sym.mutable_data_ptr<scalar_t>(), c_n, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dA = dA_sym;

    Tensor coef = at::empty({b_n}, x.options());
    coef_kernel<scalar_t><<<static_cast<int>(b_n), kThreads, 0, stream>>>(
        dA.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        out.const_data_ptr<scalar_t>(), coef.mutable_data_ptr<scalar_t>(), c_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor xc = centred<scalar_t>(x, weight, stream);
    const Tensor P = at::bmm(dA, xc);
    finish_kernel<scalar_t><<<blocks_for(b_n * n_n), kThreads, 0, stream>>>(
        P.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), coef.const_data_ptr<scalar_t>(),
        tr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
        weighted ? weight->const_data_ptr<scalar_t>() : nullptr, weighted ? weight->stride(0) : 0,
        weighted ? weight->stride(1) : 0, dx.mutable_data_ptr<scalar_t>(), dx.stride(0), dx.stride(1), dx.stride(2),
        weighted ? dw.mutable_data_ptr<scalar_t>() : nullptr, weighted ? dw.stride(0) : 0,
        weighted ? dw.stride(1) : 0, b_n, c_n, n_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw};
}

}  // namespace
}  // namespace threeg

TORCH_LIBRARY_IMPL(threeg, CUDA, m) {
  m.impl("cov_pool_ext_forward", &threeg::forward_cuda);
  m.impl("cov_pool_ext_backward", &threeg::backward_cuda);
}
