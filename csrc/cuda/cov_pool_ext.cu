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

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace threeg {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;

// Indexing. The sample b is blockIdx.x (B < 2^31: check_batch) and the elementwise kernels stride over its rows
// with blockIdx.y and over the columns with the threads of a block (rows_grid), so that no kernel divides an
// integer per element; every offset is int64_t (b * C * C passes 2^31 from B = 32769 samples for C = 256,
// b * C * N from B = 42801 for C = 256, N = 196).
#define FOR_ROWS(i, rows) for (int64_t i = blockIdx.y; i < (rows); i += gridDim.y)
#define FOR_COLS(j, begin, end) for (int64_t j = (begin) + threadIdx.x; j < (end); j += blockDim.x)

inline void check_batch(const char* op, int64_t b_n) {
  TORCH_CHECK(b_n <= std::numeric_limits<int32_t>::max(), op, ": x has B = ", b_n,
              " samples; the CUDA kernels take the sample from the grid's x dimension, which holds at most 2^31 - 1");
}

struct Launch {
  dim3 grid, block;
};

// FOR_ROWS / FOR_COLS over `rows` x `cols` of each of b_n samples: a warp multiple of threads covering a row (at
// most kThreads), as many row blocks as rows (at most the grid's y limit).
inline Launch rows_grid(int64_t b_n, int64_t rows, int64_t cols) {
  const int64_t threads = std::min<int64_t>(kThreads, (cols + 31) / 32 * 32);
  return {dim3(static_cast<unsigned>(b_n), static_cast<unsigned>(std::min(rows, kMaxGridY))),
          dim3(static_cast<unsigned>(threads))};
}

// precision='ieee' whatever TF32 setting the caller's script made (torch.backends.cuda.matmul.allow_tf32 /
// .fp32_precision, torch.set_float32_matmul_precision), for the products this op issues, restored on exit.
// at::NoTF32Guard (thread-local) sets the cuBLAS handle's math mode; the cuBLASLt route
// (torch.backends.cuda.preferred_blas_library("cublaslt")) reads only the process-wide setting, which is set to
// IEEE meanwhile and restored as threeg_kernels/_precision.py restores it for the torch backend (with torch >= 2.10,
// whose C++ API has that setting per backend; older torch: the guard alone). Both are read when a product is
// issued, so a CUDA graph captures IEEE products.
class IeeeMatmul {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
 public:
  IeeeMatmul() : before_(at::globalContext().float32Precision(kBackend, kOp)) {
    if (before_ == at::Float32Precision::TF32) {
      at::globalContext().setFloat32Precision(kBackend, kOp, at::Float32Precision::IEEE);
    }
  }
  ~IeeeMatmul() {
    if (before_ != at::Float32Precision::TF32) return;
    // The getter reports the effective value, perhaps inherited from a wider setting while this one was NONE.
    at::globalContext().setFloat32Precision(kBackend, kOp, at::Float32Precision::NONE);
    if (at::globalContext().float32Precision(kBackend, kOp) != before_) {
      at::globalContext().setFloat32Precision(kBackend, kOp, before_);
    }
  }

 private:
  static constexpr at::Float32Backend kBackend = at::Float32Backend::CUDA;
  static constexpr at::Float32Op kOp = at::Float32Op::MATMUL;
  at::NoTF32Guard no_tf32_;
  at::Float32Precision before_;
#else
  at::NoTF32Guard no_tf32_;
#endif
};

// What both ops run under: autocast off (an op called in an autocast region, or its backward when loss.backward()
// runs inside one, would have at::bmm cast to float16 / bfloat16), below autograd, on x's device, IEEE products.
struct OpScope {
  explicit OpScope(const Tensor& x) : device(x.device()) {}
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::cuda::CUDAGuard device;
  IeeeMatmul ieee;
};

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? partial[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // valid in thread 0
}

// Flat index in a sample's row of `out` of entry (i, j) of the vectorised triangle, docs/math.md (8) ('3g': i >= j;
// 'mpncov': i <= j).
__device__ __forceinline__ int64_t packed_index(int64_t i, int64_t j, int64_t c, bool lower) {
  return lower ? i * (i + 1) / 2 + j : i * c - i * (i - 1) / 2 + (j - i);
}

// One warp per row (b, c) (grid: B x row blocks of kWarps rows): xc[b, c, :] = x * w - mean over n, centred
// twice: (x * w - mu) - r with r the mean of x * w - mu, what the float mean mu misses (~ eps_mach |mu|).
// dXc = D Xc (docs/math.md (14)) then has row means D r, so the twice-centred xc applies the centring's own
// backward, dX_w = dXc - (dXc 1 / N) 1^T, which matters when the features' mean is large against their spread.
// x (B, C, N) and w (B, N) strided; xc contiguous.
template <typename scalar_t>
__global__ void centre_kernel(const scalar_t* __restrict__ x, int64_t xsb, int64_t xsc, int64_t xsn,
                              const scalar_t* __restrict__ w, int64_t wsb, int64_t wsn, int64_t c_n, int64_t n_n,
                              scalar_t* __restrict__ xc) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const scalar_t* wr = w ? w + b * wsb : nullptr;
  for (int64_t c = int64_t(blockIdx.y) * kWarps + warp; c < c_n; c += int64_t(gridDim.y) * kWarps) {
    const scalar_t* xr = x + b * xsb + c * xsc;
    scalar_t* out = xc + (b * c_n + c) * n_n;
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
}

// One block per sample, docs/math.md (1)-(2): tr = trace(P) / N + C eps, then P <- (P / N + eps I) / tr in
// place (= A).
template <typename scalar_t>
__global__ void normalise_kernel(scalar_t* __restrict__ P, scalar_t* __restrict__ tr, int64_t c_n, int64_t n_n,
                                 double eps) {
  const int64_t b = blockIdx.x;
  scalar_t* Pb = P + b * c_n * c_n;
  scalar_t diag = 0;
  for (int64_t i = threadIdx.x; i < c_n; i += blockDim.x) diag += Pb[i * (c_n + 1)];
  __shared__ scalar_t tr_b;
  diag = block_sum(diag);
  if (threadIdx.x == 0) {
    tr_b = diag / scalar_t(n_n) + scalar_t(c_n * eps);
    tr[b] = tr_b;
  }
  __syncthreads();
  const scalar_t scale = scalar_t(1) / (scalar_t(n_n) * tr_b), shift = scalar_t(eps) / tr_b;
  for (int64_t i = 0; i < c_n; ++i) {
    scalar_t* row = Pb + i * c_n;
    for (int64_t j = threadIdx.x; j < c_n; j += blockDim.x) row[j] = row[j] * scale + (i == j ? shift : scalar_t(0));
  }
}

// Step 1, docs/math.md (5): Y_1 from A and AA, and Z_1 (only when K > 1). Grid: rows_grid(B, C, C).
template <typename scalar_t>
__global__ void ns_first_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ AA,
                                scalar_t* __restrict__ Y, scalar_t* __restrict__ Z, int64_t c_n) {
  const int64_t base = int64_t(blockIdx.x) * c_n * c_n;
  FOR_ROWS(i, c_n) {
    FOR_COLS(j, 0, c_n) {
      const int64_t e = base + i * c_n + j;
      const scalar_t a = A[e];
      Y[e] = scalar_t(1.5) * a - scalar_t(0.5) * AA[e];
      if (Z) Z[e] = (i == j ? scalar_t(1.5) : scalar_t(0)) - scalar_t(0.5) * a;
    }
  }
}

// The epilogue of Z Y: T of docs/math.md (3), in place. Grid: rows_grid(B, C, C).
template <typename scalar_t>
__global__ void ns_t_kernel(scalar_t* __restrict__ T, int64_t c_n) {
  const int64_t base = int64_t(blockIdx.x) * c_n * c_n;
  FOR_ROWS(i, c_n) {
    FOR_COLS(j, 0, c_n) {
      const int64_t e = base + i * c_n + j;
      T[e] = (i == j ? scalar_t(1.5) : scalar_t(0)) - scalar_t(0.5) * T[e];
    }
  }
}

// out[b, idx(i, j)] = sqrt(tr_b) Y[b, i, j] over the order's triangle ('3g': j <= i, 'mpncov': j >= i).
// Grid: rows_grid(B, C, C).
template <typename scalar_t>
__global__ void pack_kernel(const scalar_t* __restrict__ Y, const scalar_t* __restrict__ tr,
                            scalar_t* __restrict__ out, int64_t c_n, bool lower) {
  const int64_t b = blockIdx.x;
  const scalar_t* Yb = Y + b * c_n * c_n;
  scalar_t* ob = out + b * (c_n * (c_n + 1) / 2);
  const scalar_t root = sqrt(tr[b]);
  FOR_ROWS(i, c_n) {
    FOR_COLS(j, lower ? 0 : i, lower ? i + 1 : c_n) ob[packed_index(i, j, c_n, lower)] = root * Yb[i * c_n + j];
  }
}

// dY[b, i, j] = sqrt(tr_b) G_S: the incoming gradient at the places of the order's triangle ('3g': i >= j,
// 'mpncov': i <= j), 0 elsewhere, as autograd gives it through the pack (not the sym(G_S) of docs/math.md (9),
// equal only in exact arithmetic: the reverse sweep starts from it as it is). Grid: rows_grid(B, C, C).
template <typename scalar_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ tr,
                               scalar_t* __restrict__ dY, int64_t c_n, bool lower) {
  const int64_t b = blockIdx.x;
  const scalar_t* gb = grad + b * (c_n * (c_n + 1) / 2);
  scalar_t* dYb = dY + b * c_n * c_n;
  const scalar_t root = sqrt(tr[b]);
  FOR_ROWS(i, c_n) {
    FOR_COLS(j, 0, c_n) {
      const bool in_triangle = lower ? j <= i : i <= j;
      dYb[i * c_n + j] = in_triangle ? root * gb[packed_index(i, j, c_n, lower)] : scalar_t(0);
    }
  }
}

// out = (M + M^T) / 2. Grid: rows_grid(B, C, C).
template <typename scalar_t>
__global__ void symmetrise_kernel(const scalar_t* __restrict__ M, scalar_t* __restrict__ out, int64_t c_n) {
  const int64_t base = int64_t(blockIdx.x) * c_n * c_n;
  FOR_ROWS(i, c_n) {
    FOR_COLS(j, 0, c_n) out[base + i * c_n + j] = scalar_t(0.5) * (M[base + i * c_n + j] + M[base + j * c_n + i]);
  }
}

// One block per sample: coef_b = c of docs/math.md (13).
template <typename scalar_t>
__global__ void coef_kernel(const scalar_t* __restrict__ dA, const scalar_t* __restrict__ A,
                            const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                            scalar_t* __restrict__ coef, int64_t c_n) {
  const int64_t b = blockIdx.x, cc = c_n * c_n, tri = c_n * (c_n + 1) / 2;
  scalar_t v = 0;
  for (int64_t e = threadIdx.x; e < cc; e += blockDim.x) v += dA[b * cc + e] * A[b * cc + e];
  for (int64_t e = threadIdx.x; e < tri; e += blockDim.x) v -= scalar_t(0.5) * grad[b * tri + e] * out[b * tri + e];
  v = block_sum(v);
  if (threadIdx.x == 0) coef[b] = v;
}

// One thread per (b, n) (grid: B x blocks of kThreads positions), looping over c (neighbouring threads read
// neighbouring n): docs/math.md (14) with P = sym(dA) Xc and xc centred twice (centre_kernel).
template <typename scalar_t>
__global__ void finish_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ xc,
                              const scalar_t* __restrict__ coef, const scalar_t* __restrict__ tr,
                              const scalar_t* __restrict__ x, int64_t xsb, int64_t xsc, int64_t xsn,
                              const scalar_t* __restrict__ w, int64_t wsb, int64_t wsn, scalar_t* __restrict__ dx,
                              int64_t dsb, int64_t dsc, int64_t dsn, scalar_t* __restrict__ dw, int64_t dwsb,
                              int64_t dwsn, int64_t c_n, int64_t n_n) {
  const int64_t b = blockIdx.x;
  const scalar_t s2 = scalar_t(2) / (scalar_t(n_n) * tr[b]), s2coef = s2 * coef[b];
  for (int64_t n = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; n < n_n; n += int64_t(gridDim.y) * blockDim.x) {
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
  const dim3 grid(static_cast<unsigned>(b_n), static_cast<unsigned>(std::min((c_n + kWarps - 1) / kWarps, kMaxGridY)));
  centre_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
      weighted ? weight->const_data_ptr<scalar_t>() : nullptr, weighted ? weight->stride(0) : 0,
      weighted ? weight->stride(1) : 0, c_n, n_n, xc.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return xc;
}

// Y_K from A; with `kept` (K - 1, 3, B, C, C) defined, (Y_{k-1}, Z_{k-1}, T_k) for k = 2..K written into it.
template <typename scalar_t>
Tensor newton_schulz(const Tensor& A, int64_t iters, const Tensor& kept, cudaStream_t stream) {
  const int64_t b_n = A.size(0), c_n = A.size(1);
  const Launch cc = rows_grid(b_n, c_n, c_n);
  const bool keep = kept.defined();
  auto slot = [&](int64_t k, int64_t j) { return keep && k < iters - 1 ? kept[k][j] : at::empty_like(A); };
  Tensor AA = at::bmm(A, A);
  Tensor Y = slot(0, 0);
  Tensor Z = iters > 1 ? slot(0, 1) : Tensor();
  ns_first_kernel<scalar_t><<<cc.grid, cc.block, 0, stream>>>(
      A.const_data_ptr<scalar_t>(), AA.const_data_ptr<scalar_t>(), Y.mutable_data_ptr<scalar_t>(),
      Z.defined() ? Z.mutable_data_ptr<scalar_t>() : nullptr, c_n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t k = 1; k < iters; ++k) {
    Tensor T = keep ? kept[k - 1][2] : AA;  // AA is free after step 1
    at::bmm_out(T, Z, Y);
    ns_t_kernel<scalar_t><<<cc.grid, cc.block, 0, stream>>>(T.mutable_data_ptr<scalar_t>(), c_n);
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
  const char* op = "threeg::cov_pool_ext_forward";
  check_forward_args(op, x, weight, iters, eps, precision, c10::kCUDA);
  const bool lower = is_lower_order(op, order);
  const int64_t b_n = x.size(0), c_n = x.size(1), n_n = x.size(2);
  check_batch(op, b_n);
  OpScope scope(x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor out = at::empty({b_n, triangle_size(c_n)}, x.options());
  Tensor A = at::empty({b_n, c_n, c_n}, x.options());
  Tensor tr = at::empty({b_n}, x.options());
  Tensor iterates = keep_iterates ? at::empty({iters - 1, 3, b_n, c_n, c_n}, x.options()) : at::empty({0}, x.options());
  if (b_n == 0) return {out, A, tr, iterates};  // an empty grid is not a launch configuration CUDA accepts
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_forward", [&] {
    Tensor xc = centred<scalar_t>(x, weight, stream);
    at::bmm_out(A, xc, xc.transpose(1, 2));
    normalise_kernel<scalar_t><<<static_cast<unsigned>(b_n), kThreads, 0, stream>>>(
        A.mutable_data_ptr<scalar_t>(), tr.mutable_data_ptr<scalar_t>(), c_n, n_n, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor Y = newton_schulz<scalar_t>(A, iters, keep_iterates ? iterates : Tensor(), stream);
    const Launch cc = rows_grid(b_n, c_n, c_n);
    pack_kernel<scalar_t><<<cc.grid, cc.block, 0, stream>>>(
        Y.const_data_ptr<scalar_t>(), tr.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), c_n, lower);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, A, tr, iterates};
}

std::tuple<Tensor, Tensor> backward_cuda(const Tensor& grad_in, const Tensor& x, const std::optional<Tensor>& weight,
                                         const Tensor& out_in, const Tensor& A_in, const Tensor& tr_in,
                                         const Tensor& iterates_in, int64_t iters, c10::string_view order,
                                         c10::string_view precision) {
  const char* op = "threeg::cov_pool_ext_backward";
  const int64_t b_n = x.size(0), c_n = x.size(1), n_n = x.size(2);
  check_backward_args(op, grad_in, x, weight, out_in, A_in, {b_n, c_n, c_n}, tr_in, iterates_in,
                      {iters - 1, 3, b_n, c_n, c_n}, iters, precision, c10::kCUDA);
  const bool lower = is_lower_order(op, order);
  check_batch(op, b_n);
  OpScope scope(x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool weighted = weight.has_value() && weight->defined();
  Tensor dx = at::empty_like(x);
  Tensor dw = weighted ? at::empty_like(*weight) : at::empty({0}, x.options());
  if (b_n == 0) return {dx, dw};
  const Tensor grad = grad_in.contiguous(), out = out_in.contiguous(), A = A_in.contiguous(), tr = tr_in.contiguous();
  const Launch cc = rows_grid(b_n, c_n, c_n);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_backward", [&] {
    Tensor kept = iterates_in;
    if (iters > 1 && kept.numel() == 0) {
      kept = at::empty({iters - 1, 3, b_n, c_n, c_n}, x.options());
      newton_schulz<scalar_t>(A, iters, kept, stream);
    } else if (iters > 1) {
      kept = kept.contiguous();
    }
    Tensor dY = at::empty_like(A);
    scatter_kernel<scalar_t><<<cc.grid, cc.block, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), tr.const_data_ptr<scalar_t>(), dY.mutable_data_ptr<scalar_t>(), c_n, lower);
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
    symmetrise_kernel<scalar_t><<<cc.grid, cc.block, 0, stream>>>(dA.const_data_ptr<scalar_t>(),
                                                                  dA_sym.mutable_data_ptr<scalar_t>(), c_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dA = dA_sym;

    Tensor coef = at::empty({b_n}, x.options());
    coef_kernel<scalar_t><<<static_cast<unsigned>(b_n), kThreads, 0, stream>>>(
        dA.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        out.const_data_ptr<scalar_t>(), coef.mutable_data_ptr<scalar_t>(), c_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Tensor xc = centred<scalar_t>(x, weight, stream);
    const Tensor P = at::bmm(dA, xc);
    const dim3 grid(static_cast<unsigned>(b_n),
                    static_cast<unsigned>(std::min((n_n + kThreads - 1) / kThreads, kMaxGridY)));
    finish_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        P.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), coef.const_data_ptr<scalar_t>(),
        tr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
        weighted ? weight->const_data_ptr<scalar_t>() : nullptr, weighted ? weight->stride(0) : 0,
        weighted ? weight->stride(1) : 0, dx.mutable_data_ptr<scalar_t>(), dx.stride(0), dx.stride(1), dx.stride(2),
        weighted ? dw.mutable_data_ptr<scalar_t>() : nullptr, weighted ? dw.stride(0) : 0,
        weighted ? dw.stride(1) : 0, c_n, n_n);
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
