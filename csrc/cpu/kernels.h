// CPU kernels of the "ext" backend: threeg::cov_pool_ext_forward / threeg::cov_pool_ext_backward.
//
// Compiled once per instruction set: kernels_baseline.cpp, kernels_x86_64_v3.cpp and kernels_x86_64_v4.cpp each
// include this file into their own namespace (THREEG_CPU_VARIANT) under their own target, so that every loop here
// vectorises for AVX-512 / AVX2 where the CPU has them; cov_pool_ext.cpp registers the op and picks the variant
// the CPU runs (cpu_variants.h). Every header this file needs is in kernels_deps.h, which a variant includes
// before its target pragma: only the code below is compiled for the variant's instruction set.
//
// Two exact routes to the same function, the K-step polynomial p of A (docs/math.md (15)-(16)), chosen per shape
// by gram_route() (docs/ext.md, "Routes"):
//
// The C x C spectral route, docs/math.md (15)-(20): one symmetric eigendecomposition A = U L U^T (class Eigh)
// gives the K-step result Y_K = U p(L) U^T (15)-(16) and the exact gradient of the unrolled iteration (17), its
// divided differences computed by the pair recursion (18) without cancellation.
//   forward:  Xc (1); P = Xc Xc^T, tr and A (1)-(2); Eigh of A; eigenvalues refined through R = V Xc (20);
//             p(L) (16); Y = V^T (p(L) V); out = sqrt(tr) Y packed in order (6)-(8)
//   backward: dY_K (9); <grad, out> = <dY, Y> = sum_i p(l_i) (V dY V^T)_ii; M = D o (V dY V^T) (17)-(18);
//             <dA, A> and dA Xc (19) (dA formed first when N > C); c and dX_w (13)-(14); dX, dw (14)
//   saved (21): per sample [V = U^T (C x C, row-major), L (C)], shape (B, C (C + 1)).
//
// The Gram route, docs/math.md (24)-(29), when N is small against C: A = a I + B B^T with B = Xc / sqrt(N tr),
// a = eps / tr, so only the N x N Gram matrix M = B^T B = V^T diag(m) V (rows of V: its eigenvectors) needs an
// eigendecomposition; with W = B V^T (C x N), p(A) = p(a) I + W diag(q) W^T (25) and the gradient (27)-(28)
// needs no C x C eigenvectors and no 1/m: its coefficients are higher divided differences of p from the
// Leibniz rule on the recursion (26).
//   forward:  Xc, tr = |Xc|^2 / N + C eps (no C x C product: the op's A output is empty on this route, which
//             never reads it); M = Xc^T Xc / (N tr); Eigh of M; W = Xc V^T / sqrt(N tr), m refined as |W_i|^2
//             (24); p(a), q (26); Y = p(a) I + (W diag(q)) W^T; out packed
//   backward: dY_K (9); GW = dY W, H = W^T GW (its lower triangle); q, h, F (26); <grad, out> = <dY, Y> =
//             p(a) trace(dY) + sum_i q_i H_ii; E of (28) in place of H;
//             <dA, A> (29); dA Xc = sqrt(N tr) (GW diag(q) + W E) V (28); c and dX_w (13)-(14)
//   saved (21): per sample [V (N x N, row-major), m (N), W (C x N, row-major)], shape (B, N (N + 1 + C)), below
//             the C x C route's A and [V, L] (2 C^2 + C) at every N < C; keeping W spares the backward a C N^2
//             product.
// Either route's saved state may be empty: the backward then recomputes the eigendecomposition.
//
// Samples run in parallel (at::parallel_for over the batch, samples handed out from a shared counter: the forward
// takes them in groups whose eigendecompositions run together, small_eigh.h; each thread calls single-threaded
// BLAS/LAPACK directly on its own scratch, allocated once per call). No N x N matrix is formed
// on the C x C route and no C x C eigenvector on the Gram route; the covariance, trace, normalisation, centring
// and the triangle pack/scatter are fused loops around the products.
#ifndef THREEG_CPU_VARIANT
#error "kernels.h is included by a kernels_*.cpp variant, which defines THREEG_CPU_VARIANT"
#endif

#include "kernels_deps.h"
#include "small_eigh.h"

namespace threeg {
namespace THREEG_CPU_VARIANT {
namespace {

using at::Tensor;
using small_eigh_detail::Buffer;

// The Gram route runs when N is below C by the measured margin, which narrows as C grows: N <= 13/16 C below C = 96,
// 7/8 C below C = 128, 15/16 C from there (docs/ext.md, "Routes": the crossovers measured at C = 32 .. 512);
// threeg_kernels/backends/ext_impl.py (gram_route) states the same rule for the fake kernel.
inline bool gram_route(int64_t c, int64_t n) { return 16 * n <= (c < 96 ? 13 : c < 128 ? 14 : 15) * c; }

// c (m x n) = alpha op(a) op(b) + beta c, every matrix row-major with the given leading dimension; op(.) is the
// transpose when the flag is set. (Row-major c is column-major c^T = op(b)^T op(a)^T: BLAS with a and b swapped.)
template <typename scalar_t>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, scalar_t alpha, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
#if AT_BUILD_WITH_BLAS()
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&tra, &trb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
#else
  TORCH_CHECK(false, "threeg::cov_pool_ext on CPU needs a torch built with BLAS; use backend='torch'");
#endif
}

// The lower triangle of c = alpha x y^T (m x m; x and y m x k, row-major): for a symmetric product only the
// blocks on and below the diagonal are computed, one product per block column (x y^T; for m = 512 in columns of
// 32: 136 of 256 blocks) or block row (x^T y; in rows of 16: 528 of 1024). Entries above the diagonal may hold
// anything (the diagonal blocks' upper parts are written, the rest left as they were): read c's lower triangle
// only, or mirror it. The blocks are the shapes MKL's sgemm ran fastest (one thread, warm caches, an
// Intel Xeon with AVX-512, 2026-12-07 06:28 UTC), against the whole product and the block rows of 128 used before,
// in us: x y^T in columns of 16 (32 above m = 128): m x m x k = 64 x 64 x 196 10.4 / 10.6 -> 8.1,
// 128 x 128 x 196 36.0 / 36.1 -> 25.8, 256 x 256 x 784 612 / 441 -> 360, 512 x 512 x 196 547 / 356 -> 298 (by
// rows of any height it ran slower than by columns); x^T y in rows of 16: 64 x 64 x 64 3.1 / 3.1 -> 2.2,
// 128 x 128 x 128 24.6 / 24.6 -> 15.2, 196 x 196 x 256 109 / 91 -> 62, 256 x 256 x 256 174 / 147 -> 105.
template <typename scalar_t>
void gemm_lower(int64_t m, int64_t k, scalar_t alpha, const scalar_t* x, const scalar_t* y, int64_t ld, scalar_t* c,
                int64_t ldc) {
  const int64_t block = m <= 128 ? 16 : 32;
  for (int64_t j0 = 0; j0 < m; j0 += block) {  // columns j0 .. of rows j0 ..
    const int64_t cols = std::min(block, m - j0);
    gemm<scalar_t>(false, true, m - j0, cols, k, alpha, x + j0 * ld, ld, y + j0 * ld, ld, 0, c + j0 * ldc + j0, ldc);
  }
}

// The lower triangle of c = alpha x^T y (m x m; x and y k x m, row-major), as gemm_lower.
template <typename scalar_t>
void gemm_lower_tn(int64_t m, int64_t k, scalar_t alpha, const scalar_t* x, const scalar_t* y, int64_t ld,
                   scalar_t* c, int64_t ldc) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < m; r0 += kBlock) {  // rows r0 .. r0 + 15, columns .. r0 + 15
    const int64_t rows = std::min(kBlock, m - r0);
    gemm<scalar_t>(true, false, rows, r0 + rows, k, alpha, x + r0, ld, y, ld, 0, c + r0 * ldc, ldc);
  }
}

// BLAS takes 32-bit sizes: every matrix of a sample must fit (C^2, C N and N^2 below 2^31).
inline void check_blas_sizes(const char* op, int64_t c, int64_t n) {
  const int64_t limit = std::numeric_limits<int>::max(), big = std::max(c, n);
  TORCH_CHECK(big * big < limit, op, ": C and N must have C^2, C N, N^2 below 2^31 on CPU; got C = ", c, ", N = ", n);
}

// sum_i v[i] (or v[i]^2) accumulated in double: the inputs converted a register of doubles at a time into four
// vector accumulators (one double chain is latency-bound, and the compiler may not reorder a floating-point sum
// itself), their lanes summed pairwise at the end. A version written as 16 partial sums in an array, which the
// compiler vectorised but kept, reduced and finished through the stack, took ~10% of the backward at C = 64,
// N = 196 (the centring and the backward's row means call it once per row of N).
template <bool squares, typename scalar_t>
double sum_as_double(const scalar_t* v, int64_t n) {
  // One register of doubles (kLanes), converted from kLanes inputs (half a register of float); four accumulators.
  // Everything is one register wide: GCC keeps vectors wider than the hardware's in memory.
  constexpr int64_t kLanes = THREEG_VECTOR_BYTES / sizeof(double);
  typedef double Acc __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  typedef scalar_t In __attribute__((vector_size(kLanes * sizeof(scalar_t))));
  // (the vectors pass by reference: a vector argument or result wider than the baseline's registers draws GCC's
  // ABI warning)
  auto add = [&](Acc& s, int64_t i) {
    In x;
    __builtin_memcpy(&x, v + i, sizeof(In));
    const Acc d = __builtin_convertvector(x, Acc);
    s += squares ? d * d : d;
  };
  Acc s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    add(s0, i);
    add(s1, i + kLanes);
    add(s2, i + 2 * kLanes);
    add(s3, i + 3 * kLanes);
  }
  for (; i + kLanes <= n; i += kLanes) add(s0, i);
  s0 = (s0 + s1) + (s2 + s3);
  double sum = small_eigh_detail::sum_lanes<kLanes / 2>(s0);
  for (; i < n; ++i) sum += squares ? static_cast<double>(v[i]) * v[i] : v[i];
  return sum;
}

template <typename scalar_t>
double sum_as_double(const scalar_t* v, int64_t n) {
  return sum_as_double<false>(v, n);
}

// Copies one triangle of the c x c row-major m (below the diagonal if from_lower, else above it) onto the other.
// Where a vector register holds 8 or more elements: in square blocks of one register a row, each transposed in
// registers (small_eigh_detail::transpose_block) and stored a row at a time, the rows past the last whole block
// element by element; element by element throughout (strided stores down the columns) the copy of the backward's
// C x C dY took ~15% of the backward's own loops at C = 384, N = 196 (the copy alone: 41-45 -> 15 us at C = 384,
// 71-80 -> 29-31 us at C = 512, float32 with AVX-512). With 2 or 4 elements a register, blocks that small transpose
// slower than tiles of 16 x 16 copied element by element, which run there.
template <typename scalar_t>
void mirror(scalar_t* m, int64_t c, bool from_lower) {
  constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(scalar_t);
  typedef scalar_t Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  const auto copy = [&](int64_t i, int64_t j) {  // the pair (i, j), i > j
    if (from_lower) {
      m[j * c + i] = m[i * c + j];
    } else {
      m[i * c + j] = m[j * c + i];
    }
  };
  if constexpr (kVector < 8) {
    constexpr int64_t kTile = 16;
    for (int64_t i0 = 0; i0 < c; i0 += kTile) {
      for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
        for (int64_t i = i0; i < std::min(i0 + kTile, c); ++i) {
          for (int64_t j = j0; j < std::min(j0 + kTile, i); ++j) copy(i, j);
        }
      }
    }
    return;
  }
  const int64_t whole = c / kVector * kVector;
  for (int64_t b0 = 0; b0 < whole; b0 += kVector) {
    for (int64_t b1 = 0; b1 <= b0; b1 += kVector) {
      // the source block: rows b0.., columns b1.. (below the diagonal), or its mirror image above it
      const int64_t row0 = from_lower ? b0 : b1, col0 = from_lower ? b1 : b0;
      Vec r[kVector];
      for (int64_t k = 0; k < kVector; ++k) __builtin_memcpy(&r[k], m + (row0 + k) * c + col0, sizeof(Vec));
      small_eigh_detail::transpose_block<kVector / 2>(r);
      if (b0 != b1) {
        for (int64_t k = 0; k < kVector; ++k) __builtin_memcpy(m + (col0 + k) * c + row0, &r[k], sizeof(Vec));
        continue;
      }
      // a block on the diagonal: row k takes the transposed entries on the other side of the diagonal only
      for (int64_t k = 0; k < kVector; ++k) {
        scalar_t* row = m + (b0 + k) * c + b0;
        for (int64_t j = from_lower ? k + 1 : 0; j < (from_lower ? kVector : k); ++j) row[j] = r[k][j];
      }
    }
  }
  for (int64_t i = whole; i < c; ++i) {  // the rows (and columns) past the whole blocks
    for (int64_t j = 0; j < i; ++j) copy(i, j);
  }
}

// Xc = X_w - mu 1^T of sample b into xc (C x N, contiguous); x and weight may be strided.
template <typename scalar_t>
void centre(const Tensor& x, const scalar_t* w, int64_t w_stride, int64_t b, scalar_t* xc) {
  const int64_t c_n = x.size(1), n_n = x.size(2);
  const int64_t sb = x.stride(0), sc = x.stride(1), sn = x.stride(2);
  const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * sb;
  for (int64_t c = 0; c < c_n; ++c) {
    const scalar_t* row = xb + c * sc;
    scalar_t* out = xc + c * n_n;
    if (sn == 1 && (!w || w_stride == 1)) {
      if (w) {
        for (int64_t n = 0; n < n_n; ++n) out[n] = row[n] * w[n];
      } else {
        std::copy(row, row + n_n, out);
      }
    } else {
      for (int64_t n = 0; n < n_n; ++n) out[n] = w ? row[n * sn] * w[n * w_stride] : row[n * sn];
    }
    const scalar_t mu = static_cast<scalar_t>(sum_as_double(out, n_n) / n_n);
    for (int64_t n = 0; n < n_n; ++n) out[n] -= mu;
  }
}

// SmallEigh's call, one function per dtype: its steps are forced inline (small_eigh.h) into these, not into Eigh's
// callers.
void small_eigh(SmallEigh<float>& e, int g, const float* const* a, float* const* v, float* const* l, bool* ok) {
  e(g, a, v, l, ok);
}
void small_eigh(SmallEigh<double>& e, int g, const double* const* a, double* const* v, double* const* l,
                bool* ok) {
  e(g, a, v, l, ok);
}

// SmallEigh up to these sizes, syevd above: per instruction set and dtype, the largest size at which the own solver
// was ahead of syevd by at least 4% in each of two measured runs (docs/ext.md, "Eigensolver": fwd+bwd of the op,
// C x C route, one core of an Intel Xeon with AVX-512, MKL's syevd; the own solver's speed falls with the vector
// width, syevd's does not). syevd / own at these sizes in the two runs:
#if THREEG_VECTOR_BYTES == 64
constexpr int64_t kSmallEighMaxFloat = 256, kSmallEighMaxDouble = 160;  // 1.15-1.18x / 1.04-1.08x
#elif THREEG_VECTOR_BYTES == 32
constexpr int64_t kSmallEighMaxFloat = 192, kSmallEighMaxDouble = 96;  // 1.04-1.09x / 1.09-1.19x
#else
constexpr int64_t kSmallEighMaxFloat = 64, kSmallEighMaxDouble = 32;  // 1.20-1.31x / 1.15-1.28x
#endif
template <typename scalar_t>
constexpr int64_t kSmallEighMax = std::is_same_v<scalar_t, float> ? kSmallEighMaxFloat : kSmallEighMaxDouble;

// THREEG_EXT_EIGH picks the eigensolver for every size instead: "own" (SmallEigh) or "syevd"; "own-strict" is
// "own" raising where the QL iteration does not converge instead of falling back to syevd (how the tests check that
// it converges); unset or "auto": by size. Read when an op starts, so a process can compare the two
// (benchmarks/ext_cpu_speed.py --eigh).
enum class EighChoice { kAuto, kOwn, kOwnStrict, kSyevd };
inline EighChoice eigh_choice() {
  const char* v = std::getenv("THREEG_EXT_EIGH");
  const std::string s = v == nullptr ? "" : v;
  if (s.empty() || s == "auto") return EighChoice::kAuto;
  if (s == "own") return EighChoice::kOwn;
  if (s == "own-strict") return EighChoice::kOwnStrict;
  if (s == "syevd") return EighChoice::kSyevd;
  TORCH_CHECK(false, "THREEG_EXT_EIGH must be 'auto', 'own', 'own-strict' or 'syevd'; got '", s, "'");
  return EighChoice::kAuto;
}

// The eigendecompositions of symmetric n x n matrices `a` (row-major; the lower triangle is all syevd reads, the
// own solver reads both: needs_both_triangles()) into slot = [V row-major
// (n x n, row i the i-th eigenvector), eigenvalues (n), ascending]: SmallEigh for n <= kSmallEighMax (or as
// `choice` says), up to group() matrices at once, LAPACK's syevd above it and for any matrix whose QL iteration
// does not converge. A sample with a non-finite trace (NaN/Inf inputs) gets NaN, as the iteration would give.
// LAPACK's workspace size is asked once per thread, when needed.
template <typename scalar_t>
class Eigh {
 public:
  Eigh(int64_t n, EighChoice choice) : n_(n), strict_(choice == EighChoice::kOwnStrict) {
    const bool own = choice == EighChoice::kOwn || strict_ ||
                     (choice == EighChoice::kAuto && n <= kSmallEighMax<scalar_t>);
    if (own) small_ = &thread_solver(n);
  }

  // How many matrices one call solves together: SmallEigh's group, or 1 where syevd runs (nothing to gain).
  int group() const { return small_ != nullptr ? kGroup : 1; }

  // Whether `a` must hold both triangles (the own solver), or only the lower one (syevd).
  bool needs_both_triangles() const { return small_ != nullptr; }

  // For j < g <= group(): a[j] into slot[j], NaN where finite[j] is false.
  void operator()(int g, const scalar_t* const* a, const bool* finite, scalar_t* const* slot) {
    const int64_t nn = n_ * n_;
    bool ok[kGroup] = {};
    if (small_ != nullptr) {  // the finite matrices, together
      const scalar_t* mats[kGroup];
      scalar_t *vecs[kGroup], *vals[kGroup];
      bool converged[kGroup];
      int which[kGroup], m = 0;
      for (int j = 0; j < g; ++j) {
        if (!finite[j]) continue;
        mats[m] = a[j];
        vecs[m] = slot[j];
        vals[m] = slot[j] + nn;
        which[m++] = j;
      }
      if (m > 0) small_eigh(*small_, m, mats, vecs, vals, converged);
      for (int i = 0; i < m; ++i) ok[which[i]] = converged[i];
    }
    for (int j = 0; j < g; ++j) {
      if (finite[j] && !ok[j]) {
        TORCH_CHECK(!strict_, "THREEG_EXT_EIGH=own-strict: the QL iteration of the own eigensolver did not converge "
                    "for a ", n_, " x ", n_, " matrix");
        ok[j] = lapack(a[j], slot[j]);
      }
      if (!ok[j]) std::fill(slot[j], slot[j] + nn + n_, std::numeric_limits<scalar_t>::quiet_NaN());
    }
  }

  void operator()(const scalar_t* a, bool finite, scalar_t* slot) { (*this)(1, &a, &finite, &slot); }

 private:
  bool lapack(const scalar_t* a, scalar_t* slot) {
#if AT_BUILD_WITH_LAPACK()
    const int n = static_cast<int>(n_);
    int info = 0;
    if (work_.empty()) {
      scalar_t work_size = 0, a0 = 0, l0 = 0;
      int iwork_size = 0;
      at::native::lapackSyevd<scalar_t, scalar_t>('V', 'U', n, &a0, n, &l0, &work_size, -1, nullptr, 0, &iwork_size,
                                                  -1, &info);
      work_.resize(std::max<int64_t>(1, static_cast<int64_t>(work_size)));
      iwork_.resize(std::max(1, iwork_size));
    }
    // Row-major `a` read as column-major is a^T: its upper triangle ('U') is a's lower one.
    std::copy(a, a + n_ * n_, slot);
    at::native::lapackSyevd<scalar_t, scalar_t>('V', 'U', n, slot, n, slot + n_ * n_, work_.data(),
                                                static_cast<int>(work_.size()), nullptr, 0, iwork_.data(),
                                                static_cast<int>(iwork_.size()), &info);
    return info == 0;
#else
    TORCH_CHECK(false, "threeg::cov_pool_ext on CPU needs a torch built with LAPACK for an eigendecomposition of size ",
                n_, " (above ", kSmallEighMax<scalar_t>, ", THREEG_EXT_EIGH=syevd, or where the QL iteration did not "
                "converge); use backend='torch'");
    return false;
#endif
  }

  // The own solver of size n of the calling thread, kept between calls (one per thread and dtype, for the last size
  // asked for; an op's thread holds one Eigh at a time, so none is rebuilt under another's use): built at every call,
  // its scratch (eight matrices' rows, the rotations' records: ~0.6 MB at n = 64, ~6.5 MB used of ~9 MB at n = 256,
  // float32) came back from the allocator cold and its records grew by reallocation. Kept, the forward at (C, N) =
  // (64, 196) took ~15% less, at (128, 196) ~4% (docs/ext.md, "Per-call cost").
  static SmallEigh<scalar_t>& thread_solver(int64_t n) {
    static thread_local std::optional<SmallEigh<scalar_t>> solver;
    if (!solver.has_value() || solver->size() != n) solver.emplace(n);
    return *solver;
  }

  int64_t n_;
  bool strict_;
  SmallEigh<scalar_t>* small_ = nullptr;  // the own solver (thread_solver), when it runs
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
// `shift` = eps / tr: the eigensolvers' own eigenvalues are too coarse at eps / tr, where p amplifies their error by
// 1.5^K. The squared form is >= eps / tr and brings float32 back to the iteration's accuracy.
template <typename scalar_t>
void rayleigh_eigenvalues(const scalar_t* R, int64_t c, int64_t n, double tr_b, double shift, scalar_t* l) {
  for (int64_t i = 0; i < c; ++i) {
    l[i] = static_cast<scalar_t>(sum_as_double<true>(R + i * n, n) / (n * tr_b) + shift);
  }
}

// How many of the ascending eigenvalues l (c of them) (20) refines: those below kRefineBelow times the largest.
// Above it the solver's own error, ~eps_mach l_max, is at most 100 ulps of the eigenvalue, of which p (slope
// ~1 / (2 sqrt(l)) there) passes on half relative to p(l); below, down to eps / tr, it grows without bound, and the
// refinement is what keeps float32 accurate (docs/math.md, "Eigenvalue refinement"; measured in docs/ext.md). The
// refined ones come first: only those rows of V Xc are formed.
constexpr double kRefineBelow = 1e-2;
template <typename scalar_t>
int64_t rows_to_refine(const scalar_t* l, int64_t c) {
  const double limit = kRefineBelow * static_cast<double>(l[c - 1]);
  int64_t k = 0;
  while (k < c && !(static_cast<double>(l[k]) >= limit)) ++k;  // NaN: refine (and stay NaN)
  return k;
}

// Row i of D: dy[j] = p[l_i, l_j] for every j, by the pair recursion docs/math.md (18) with a = l_i, b = l_j.
template <typename scalar_t>
THREEG_INLINE void divided_differences(int64_t i, int64_t c, int64_t iters, const scalar_t* ys, const scalar_t* zs,
                                       const scalar_t* ts, scalar_t* __restrict__ dy, scalar_t* __restrict__ dz) {
  for (int64_t j = 0; j < c; ++j) {
    dy[j] = 1;
    dz[j] = 0;
  }
  for (int64_t k = 0; k < iters; ++k) {
    const scalar_t ya = ys[k * c + i], za = zs[k * c + i], ta = ts[k * c + i];
    const scalar_t* __restrict__ yb = ys + k * c;
    const scalar_t* __restrict__ zb = zs + k * c;
    const scalar_t* __restrict__ tb = ts + k * c;
    for (int64_t j = 0; j < c; ++j) {
      const scalar_t dt = scalar_t(-0.5) * (dz[j] * yb[j] + za * dy[j]);
      const scalar_t dy_next = dy[j] * tb[j] + ya * dt;
      dz[j] = dt * zb[j] + ta * dz[j];
      dy[j] = dy_next;
    }
  }
}

// M <- D o M, docs/math.md (17): row i of M scaled by row i of D. D is symmetric, but its full rows (twice the
// recursion's work, which vectorises) scale M along rows, where half rows would scale half of it down columns.
// Returns sum_i (D o M)_ii l_i, what <dA, A> needs. ys, zs, ts: trajectories(); dy, dz: scratch of c.
template <typename scalar_t>
THREEG_INLINE double scale_by_divided_differences(scalar_t* M, const scalar_t* l, int64_t c, int64_t iters,
                                                  const scalar_t* ys, const scalar_t* zs, const scalar_t* ts,
                                                  scalar_t* dy, scalar_t* dz) {
  double dA_dot_A = 0;
  for (int64_t i = 0; i < c; ++i) {
    divided_differences<scalar_t>(i, c, iters, ys, zs, ts, dy, dz);
    scalar_t* row = M + i * c;
    for (int64_t j = 0; j < c; ++j) row[j] *= dy[j];
    dA_dot_A += static_cast<double>(row[i]) * l[i];
  }
  return dA_dot_A;
}
// The divided differences of the Gram route, docs/math.md (26): the recursion (16) run on the nodes
// (l_i, a, a, l_j), l_i = a + m_i, with the Leibniz rule (g h)[x_0..x_r] = sum_s g[x_0..x_s] h[x_s..x_r] for the
// products t = 1.5 - 0.5 z y, y <- y t, z <- t z. In double: O(K N) per sample, O(K N^2) for the rows of F.
class GramRecursion {
 public:
  // After run(): p(a), p'(a), and per i: q_i = p[l_i, a], h_i = p[l_i, a, a].
  double pa = 0, dpa = 0;
  std::vector<double> q, h;

  // keep_steps: keep every step's values for row() (the backward).
  template <typename scalar_t>
  void run(const scalar_t* m, int64_t n, double a, int64_t iters, bool keep_steps) {
    n_ = n;
    iters_ = iters;
    q.assign(n, 0);
    h.assign(n, 0);
    std::vector<double>& s = steps_;
    s.resize(keep_steps ? kArrays * iters * n : kArrays * n);
    // f, f[., a], f[., a, a] of y_0 = l and z_0 = 1 (a node repeated is a derivative: y[a, a] = 1)
    std::vector<double> y(n), y1(n, 1.0), y2(n, 0.0), z(n, 1.0), z1(n, 0.0), z2(n, 0.0);
    for (int64_t i = 0; i < n; ++i) y[i] = a + static_cast<double>(m[i]);
    double ya = a, ya1 = 1, za = 1, za1 = 0;  // y(a), y'(a), z(a), z'(a)
    for (int64_t k = 0; k < iters; ++k) {
      const double ta = 1.5 - 0.5 * za * ya, ta1 = -0.5 * (za1 * ya + za * ya1);
      double* st = s.data() + (keep_steps ? kArrays * k * n : 0);
      for (int64_t i = 0; i < n; ++i) {
        const double t = 1.5 - 0.5 * z[i] * y[i];
        const double t1 = -0.5 * (z[i] * y1[i] + z1[i] * ya);
        const double t2 = -0.5 * (z[i] * y2[i] + z1[i] * ya1 + z2[i] * ya);
        const double vals[kArrays] = {y[i], y1[i], y2[i], z[i], z1[i], z2[i], t, t1, t2};
        for (int64_t r = 0; r < kArrays; ++r) st[r * n + i] = vals[r];
        y2[i] = y[i] * t2 + y1[i] * ta1 + y2[i] * ta;
        y1[i] = y[i] * t1 + y1[i] * ta;
        y[i] = y[i] * t;
        z2[i] = t * z2[i] + t1 * za1 + t2 * za;
        z1[i] = t * z1[i] + t1 * za;
        z[i] = t * z[i];
      }
      ya1 = ya1 * ta + ya * ta1;
      ya = ya * ta;
      za1 = ta * za1 + ta1 * za;
      za = ta * za;
    }
    pa = ya;
    dpa = ya1;
    for (int64_t i = 0; i < n; ++i) {
      q[i] = y1[i];
      h[i] = y2[i];
    }
  }

  // Row i of F: f[j] = p[l_i, a, a, l_j] for j <= i (F is symmetric). z3: scratch of n.
  void row(int64_t i, double* __restrict__ f, double* __restrict__ z3) const {
    const int64_t n = n_, cols = i + 1;
    std::fill(f, f + cols, 0.0);
    std::fill(z3, z3 + cols, 0.0);
    for (int64_t k = 0; k < iters_; ++k) {
      const double* st = steps_.data() + kArrays * k * n;
      const double *y = st, *y1 = st + n, *y2 = st + 2 * n, *z = st + 3 * n, *z1 = st + 4 * n, *z2 = st + 5 * n;
      const double *t = st + 6 * n, *t1 = st + 7 * n, *t2 = st + 8 * n;
      const double yi = y[i], y1i = y1[i], y2i = y2[i], zi = z[i], z1i = z1[i], z2i = z2[i];
      const double ti = t[i], t1i = t1[i], t2i = t2[i];
      for (int64_t j = 0; j < cols; ++j) {
        // nodes (l_i, a, a, l_j): g[l_i] h3 + g[l_i, a] h[a, a, l_j] + g[l_i, a, a] h[a, l_j] + g3 h(l_j)
        const double t3 = -0.5 * (zi * f[j] + z1i * y2[j] + z2i * y1[j] + z3[j] * y[j]);
        const double y3 = yi * t3 + y1i * t2[j] + y2i * t1[j] + f[j] * t[j];
        z3[j] = ti * z3[j] + t1i * z2[j] + t2i * z1[j] + t3 * z[j];
        f[j] = y3;
      }
    }
  }

 private:
  static constexpr int64_t kArrays = 9;  // y, y1, y2, z, z1, z2, t, t1, t2 of one step
  int64_t n_ = 0, iters_ = 0;
  std::vector<double> steps_;
};

// Samples are handed out from a shared counter (one at a time, or a small group) rather than in fixed halves: on
// a shared machine a thread that is descheduled leaves its samples to the others instead of holding up the op.
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

// Calls f(i, j0, j1, idx) for each row i of the vectorised triangle in its order, docs/math.md (7)-(8): its
// entries (i, j0) .. (i, j1 - 1) sit at flat indices idx .. idx + j1 - j0 - 1.
template <typename F>
inline void for_triangle_rows(int64_t c, bool lower, F f) {
  int64_t idx = 0;
  for (int64_t i = 0; i < c; ++i) {
    const int64_t j0 = lower ? 0 : i, j1 = lower ? i + 1 : c;
    f(i, j0, j1, idx);
    idx += j1 - j0;
  }
}

// Per sample saved state ("iterates") of the route for (C, N): docs/math.md (21).
inline int64_t slot_size(int64_t c, int64_t n) { return gram_route(c, n) ? n * (n + 1 + c) : c * (c + 1); }

// The op's A output: (B, C, C) on the C x C route; on the Gram route, whose backward reads only x and the saved
// state, it is empty (0) and never formed (no C x C product in its forward): docs/math.md (21).
inline std::vector<int64_t> A_shape(int64_t b, int64_t c, int64_t n) {
  return gram_route(c, n) ? std::vector<int64_t>{0} : std::vector<int64_t>{b, c, c};
}

// The Gram matrix of one sample, docs/math.md (24): M = Xc^T Xc / (N tr) into `gram` (N x N): its lower triangle,
// mirrored when the eigensolver reads both (Eigh::needs_both_triangles).
template <typename scalar_t>
void gram_matrix(const scalar_t* xc, int64_t c, int64_t n, double tr_b, bool both_triangles, scalar_t* gram) {
  gemm_lower_tn<scalar_t>(n, c, static_cast<scalar_t>(1.0 / (n * tr_b)), xc, xc, n, gram, n);
  if (both_triangles) mirror(gram, n, true);
}

// With M's eigendecomposition in slot = [V (N x N), m (N)]: W = Xc V^T / sqrt(N tr) and m_i = |W_i|^2, the
// eigenvalues as Rayleigh quotients v_i^T M v_i, the Gram route's (20).
template <typename scalar_t>
void gram_vectors(const scalar_t* xc, int64_t c, int64_t n, double tr_b, scalar_t* slot, scalar_t* W,
                  std::vector<double>& norms) {
  gemm<scalar_t>(false, true, c, n, n, static_cast<scalar_t>(1.0 / std::sqrt(n * tr_b)), xc, n, slot, n, 0, W, n);
  std::fill(norms.begin(), norms.end(), 0.0);
  for (int64_t ci = 0; ci < c; ++ci)
    for (int64_t j = 0; j < n; ++j) norms[j] += static_cast<double>(W[ci * n + j]) * W[ci * n + j];
  for (int64_t j = 0; j < n; ++j) slot[n * n + j] = static_cast<scalar_t>(norms[j]);
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
  check_blas_sizes(op, c, n);
  const bool weighted = weight.has_value() && weight->defined();
  const bool gram = gram_route(c, n);
  const int64_t slot_n = slot_size(c, n);
  Tensor out = at::empty({b_n, triangle_size(c)}, x.options());
  Tensor A = at::empty(A_shape(b_n, c, n), x.options());
  Tensor tr = at::empty({b_n}, x.options());
  Tensor iterates = keep_iterates ? at::empty({b_n, slot_n}, x.options()) : at::empty({0}, x.options());
  if (b_n == 0) return {out, A, tr, iterates};

  const EighChoice choice = eigh_choice();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_forward", [&] {
    const scalar_t* w = weighted ? weight->const_data_ptr<scalar_t>() : nullptr;
    const int64_t w_sb = weighted ? weight->stride(0) : 0, w_sn = weighted ? weight->stride(1) : 0;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    scalar_t* A_p = A.mutable_data_ptr<scalar_t>();
    scalar_t* tr_p = tr.mutable_data_ptr<scalar_t>();
    scalar_t* slots = keep_iterates ? iterates.mutable_data_ptr<scalar_t>() : nullptr;
    std::atomic<int64_t> next{0};
    const int64_t threads = threads_for(b_n), per_thread = (b_n + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      SequentialBlas sequential_blas;
      Eigh<scalar_t> eigh(gram ? n : c, choice);
      // Samples are taken `group` at a time so that their eigendecompositions run together (Eigh::group()).
      const int group = static_cast<int>(std::min<int64_t>(eigh.group(), per_thread));
      // (Buffer: not zeroed; each is written before it is read.) Xc of each sample of a group on the Gram route, which
      // reads it again after the eigendecompositions; one on the C x C route, which reads it again only where it
      // refines eigenvalues, and centres the sample again there: eight of them (400 KB at C = 64, N = 196) pushed
      // out of the core's caches what the Python around the op runs on, ~3% of a call (docs/ext.md, "Per-call cost").
      const int64_t kept_xc = gram ? group : 1;
      Buffer<scalar_t> xcs(kept_xc * c * n), prod(c * c), own_slots(keep_iterates ? 0 : group * slot_n);
      Buffer<scalar_t> grams(gram ? group * n * n : 0);  // Gram route: M of each sample in the group
      // C x C route: proj = V Xc (C x N), scaled = p(L) V (C x C); Gram route: W diag(q) (C x N), W in the slot
      Buffer<scalar_t> work1(gram ? 0 : c * n), work2(gram ? 0 : c * c), work3(gram ? c * n : 0);
      Buffer<scalar_t> p(c);
      std::vector<double> norms(n);
      GramRecursion recursion;
      for (int64_t b0 = next.fetch_add(group); b0 < b_n; b0 = next.fetch_add(group)) {
        const int g = static_cast<int>(std::min<int64_t>(group, b_n - b0));
        const scalar_t* mats[kGroup];  // what each sample's eigendecomposition is of: A or M
        scalar_t* slot_of[kGroup];
        bool finite[kGroup];
        double trs[kGroup];
        for (int gi = 0; gi < g; ++gi) {
          const int64_t b = b0 + gi;
          scalar_t* xc = xcs.data() + (gi % kept_xc) * c * n;
          centre<scalar_t>(x, w ? w + b * w_sb : nullptr, w_sn, b, xc);
          if (gram) {  // trace(Xc Xc^T) = |Xc|^2; M, not A, is what the route decomposes
            const double tr_b = sum_as_double<true>(xc, c * n) / n + c * eps;
            trs[gi] = tr_b;
            gram_matrix<scalar_t>(xc, c, n, tr_b, eigh.needs_both_triangles(), grams.data() + gi * n * n);
            mats[gi] = grams.data() + gi * n * n;
          } else {
            scalar_t* P = prod.data();
            gemm_lower<scalar_t>(c, n, 1, xc, xc, n, P, c);  // Xc Xc^T, its lower triangle
            double trace = 0;
            for (int64_t i = 0; i < c; ++i) trace += P[i * (c + 1)];
            const double tr_b = trace / n + c * eps;
            trs[gi] = tr_b;
            const scalar_t scale = static_cast<scalar_t>(1.0 / (n * tr_b)), shift = static_cast<scalar_t>(eps / tr_b);
            scalar_t* Ab = A_p + b * c * c;
            for (int64_t i = 0; i < c; ++i) {  // A's lower triangle, then mirrored: exactly symmetric
              for (int64_t j = 0; j < i; ++j) Ab[i * c + j] = P[i * c + j] * scale;
              Ab[i * (c + 1)] = P[i * (c + 1)] * scale + shift;
            }
            mirror(Ab, c, true);
            mats[gi] = Ab;
          }
          tr_p[b] = static_cast<scalar_t>(trs[gi]);
          finite[gi] = std::isfinite(trs[gi]);
          slot_of[gi] = keep_iterates ? slots + b * slot_n : own_slots.data() + gi * slot_n;
        }
        eigh(g, mats, finite, slot_of);
        int64_t xc_of = b0 + g - 1;  // the sample whose Xc the C x C route's one buffer holds

        for (int gi = 0; gi < g; ++gi) {
          const int64_t b = b0 + gi;
          const double tr_b = trs[gi];
          scalar_t* xc = xcs.data() + (gi % kept_xc) * c * n;
          scalar_t* P = prod.data();
          scalar_t* slot = slot_of[gi];
          double diag = 0;  // what Y adds on the diagonal: p(a) on the Gram route
          if (gram) {
            scalar_t* W = slot + n * (n + 1);
            gram_vectors<scalar_t>(xc, c, n, tr_b, slot, W, norms);
            recursion.run(slot + n * n, n, eps / tr_b, iters, false);
            scalar_t* Wq = work3.data();
            for (int64_t ci = 0; ci < c; ++ci)
              for (int64_t j = 0; j < n; ++j) Wq[ci * n + j] = W[ci * n + j] * static_cast<scalar_t>(recursion.q[j]);
            gemm_lower<scalar_t>(c, n, 1, Wq, W, n, P, c);  // W diag(q) W^T, docs/math.md (25): lower triangle
            diag = recursion.pa;
          } else {
            scalar_t* V = slot;
            scalar_t* proj = work1.data();
            const int64_t k = rows_to_refine(V + c * c, c);
            if (k > 0) {  // rows 0 .. k - 1 of V Xc, Xc centred again unless the buffer holds this sample's
              if (xc_of != b) centre<scalar_t>(x, w ? w + b * w_sb : nullptr, w_sn, b, xc);
              xc_of = b;
              gemm<scalar_t>(false, false, k, n, c, 1, V, c, xc, n, 0, proj, n);
            }
            rayleigh_eigenvalues<scalar_t>(proj, k, n, tr_b, eps / tr_b, V + c * c);
            trajectories<scalar_t>(V + c * c, c, iters, nullptr, nullptr, nullptr, p.data());
            scalar_t* scaled = work2.data();
            for (int64_t i = 0; i < c; ++i)
              for (int64_t j = 0; j < c; ++j) scaled[i * c + j] = p[i] * V[i * c + j];
            gemm_lower_tn<scalar_t>(c, c, 1, V, scaled, c, P, c);  // Y = V^T p(L) V: its lower triangle
          }

          const scalar_t* Y = P;
          const scalar_t root = static_cast<scalar_t>(std::sqrt(tr_b));
          const scalar_t root_diag = static_cast<scalar_t>(std::sqrt(tr_b) * diag);
          scalar_t* o = out_p + b * triangle_size(c);
          // Y's lower triangle only (gemm_lower, gemm_lower_tn): the upper order reads it mirrored. Row loops over
          // contiguous entries that vectorise; an element-wise read of either triangle with the diagonal's test was a
          // scalar loop: the forward at C = 256, N = 49 took 13-16% less without it.
          if (!lower) mirror(P, c, true);
          for_triangle_rows(c, lower, [&](int64_t i, int64_t j0, int64_t j1, int64_t idx) {
            const scalar_t* row = Y + i * c;
            for (int64_t j = j0; j < j1; ++j) o[idx + j - j0] = root * row[j];
            if (gram) o[idx + i - j0] += root_diag;
          });
        }
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
  check_blas_sizes(op, c, n);
  const bool gram = gram_route(c, n);
  const int64_t slot_n = slot_size(c, n);
  check_backward_args(op, grad_in, x, weight, out_in, A_in, A_shape(b_n, c, n), tr_in, iterates, {b_n, slot_n}, iters,
                      precision, c10::kCPU);
  const bool lower = is_lower_order(op, order);
  const bool weighted = weight.has_value() && weight->defined();
  const bool saved = iterates.numel() != 0;
  Tensor dx = at::empty_like(x);
  Tensor dw = weighted ? at::empty_like(*weight) : at::empty({0}, x.options());
  if (b_n == 0) return {dx, dw};
  // (`out` is only checked: the backward takes <grad, out> from its own products)
  const Tensor grad = grad_in.contiguous(), A = A_in.contiguous(), tr = tr_in.contiguous();
  const Tensor slots = saved ? iterates.contiguous() : iterates;
  // C x C route: apply dA to Xc without forming dA while that is cheaper (N <= C: 3 C^2 N flops against
  // 2 C^3 + C^2 N).
  const bool via_eigenbasis = n <= c;
  const bool lower_halves = c >= 128;  // the symmetric C x C products of the C x C route by halves (below)

  const EighChoice choice = eigh_choice();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cov_pool_ext_backward", [&] {
    const scalar_t* w = weighted ? weight->const_data_ptr<scalar_t>() : nullptr;
    const int64_t w_sb = weighted ? weight->stride(0) : 0, w_sn = weighted ? weight->stride(1) : 0;
    const int64_t tri = triangle_size(c);
    const scalar_t* sd = saved ? slots.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* tr_p = tr.const_data_ptr<scalar_t>();
    const int64_t xs1 = x.stride(1), xs2 = x.stride(2), ds1 = dx.stride(1), ds2 = dx.stride(2);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads_for(b_n), 1, [&](int64_t, int64_t) {
      SequentialBlas sequential_blas;
      Buffer<scalar_t> xc(c * n), dY(c * c), own_slot(saved ? 0 : slot_n);  // (not zeroed: written before read)
      // C x C route: Q, M (C x C), R1, R2 (C x N); Gram route: GW, R (C x N), H (N x N), gram (N x N)
      Buffer<scalar_t> work1(gram ? 0 : c * c), work2(gram ? c * n : c * c), work3(c * n);
      Buffer<scalar_t> work4(gram ? 0 : c * n);
      Buffer<scalar_t> work5(gram ? n * n : 0), work6(gram && !saved ? n * n : 0);
      Buffer<scalar_t> traj(gram ? 0 : 3 * iters * c), p(c), ddy(c), ddz(c);
      Buffer<scalar_t> dxw_row(n);
      std::vector<double> dw_acc(n), norms(gram ? n : 0), frow(gram ? n : 0), fscratch(gram ? n : 0);
      GramRecursion recursion;
      std::vector<Eigh<scalar_t>> eigh;  // only to recompute
      if (!saved) eigh.emplace_back(gram ? n : c, choice);
      for (int64_t b = next++; b < b_n; b = next++) {
        const double tr_b = tr_p[b];
        centre<scalar_t>(x, w ? w + b * w_sb : nullptr, w_sn, b, xc.data());
        const scalar_t* xcp = xc.data();
        // eps / tr from trace(A) = 1 = |Xc|^2 / (N tr) + C eps / tr (the backward has no eps): its error,
        // ~ eps_mach / C from the rounding of tr, is far below the eigensolver's on the C x C route; on the Gram
        // route the backward reads a only through the derivatives p'(a), h and F, which it barely moves.
        auto recovered_shift = [&] {
          return std::max(0.0, (1.0 - sum_as_double<true>(xcp, c * n) / (n * tr_b)) / c);
        };
        scalar_t* own = own_slot.data();  // written only when the eigendecomposition is recomputed
        const scalar_t* slot = saved ? sd + b * slot_n : own;

        // dY_K = sqrt(tr) sym(G_S), docs/math.md (9): the triangle into its half of dY row by row, then mirrored;
        // trace(dY). <grad, out> of (13) equals <dY, Y> (out packs sqrt(tr) Y, and dY weighs each off-diagonal entry
        // of the triangle half on each side): it is taken below from what each route forms anyway, the diagonal of
        // V dY V^T or of W^T dY W, so the backward never reads `out` (B C (C + 1) / 2 values: 8.4 MB at B = 16,
        // C = 512, read from memory when another computation has filled the caches since the forward).
        const scalar_t* g = grad.const_data_ptr<scalar_t>() + b * tri;
        scalar_t* dy = dY.data();
        const scalar_t root = static_cast<scalar_t>(std::sqrt(tr_b)), half_root = root * scalar_t(0.5);
        double grad_out = 0;
        double trace_dy = 0;
        for_triangle_rows(c, lower, [&](int64_t i, int64_t j0, int64_t j1, int64_t idx) {
          scalar_t* row = dy + i * c;
          const scalar_t* gi = g + idx - j0;  // gi[j]: the entry (i, j)
          for (int64_t j = j0; j < j1; ++j) row[j] = half_root * gi[j];
          row[i] = root * gi[i];
          trace_dy += row[i];
        });
        mirror(dy, c, lower);

        double dA_dot_A = 0;
        const scalar_t* pp = nullptr;  // dA Xc / dscale
        double dscale = 1;
        if (gram) {
          const scalar_t* W = slot + n * (n + 1);  // as the forward kept it, or recomputed here
          scalar_t* GW = work2.data();
          scalar_t* R = work3.data();
          scalar_t* H = work5.data();
          if (!saved) {
            gram_matrix<scalar_t>(xcp, c, n, tr_b, eigh[0].needs_both_triangles(), work6.data());
            eigh[0](work6.data(), std::isfinite(tr_b), own);
            gram_vectors<scalar_t>(xcp, c, n, tr_b, own, own + n * (n + 1), norms);
          }
          const scalar_t* m = slot + n * n;
          const double a = recovered_shift();
          recursion.run(m, n, a, iters, true);
          const std::vector<double>&q = recursion.q, &h = recursion.h;
          gemm<scalar_t>(false, false, c, n, c, 1, dy, c, W, n, 0, GW, n);  // dY W
          gemm_lower_tn<scalar_t>(n, c, 1, W, GW, n, H, n);                  // W^T dY W, its lower triangle
          // <dA, A> = a trace(dA) + trace(W^T dA W), docs/math.md (29), from the diagonal of H before E replaces it;
          // <dY, Y> = p(a) trace(dY) + sum_i q_i H_ii, Y = p(a) I + W diag(q) W^T (25).
          double trace_dA = recursion.dpa * trace_dy, inner = 0;
          grad_out = recursion.pa * trace_dy;
          for (int64_t i = 0; i < n; ++i) {
            recursion.row(i, frow.data(), fscratch.data());
            const double mi = m[i], fii = frow[i], hii = H[i * n + i];
            trace_dA += (2 * h[i] + fii * mi) * hii;
            inner += (q[i] + mi * h[i] + mi * mi * fii) * hii;
            grad_out += q[i] * hii;
            // E = diag(h) H + (F o H) diag(m), docs/math.md (28), over the row's j < i and their mirrors, from H's
            // lower triangle (no entry of it is written before its row is reached)
            for (int64_t j = 0; j < i; ++j) {
              const double f = frow[j], hij = H[i * n + j];
              H[i * n + j] = static_cast<scalar_t>((h[i] + f * m[j]) * hij);
              H[j * n + i] = static_cast<scalar_t>((h[j] + f * mi) * hij);
            }
            H[i * n + i] = static_cast<scalar_t>((h[i] + fii * mi) * hii);
          }
          dA_dot_A = a * trace_dA + inner;
          for (int64_t ci = 0; ci < c; ++ci)
            for (int64_t j = 0; j < n; ++j) GW[ci * n + j] *= static_cast<scalar_t>(q[j]);
          gemm<scalar_t>(false, false, c, n, n, 1, W, n, H, n, 1, GW, n);  // dA W = dY W diag(q) + W E
          gemm<scalar_t>(false, false, c, n, n, 1, GW, n, slot, n, 0, R, n);  // dA Xc / sqrt(N tr)
          pp = R;
          dscale = std::sqrt(n * tr_b);
        } else {
          const scalar_t* V = slot;
          const scalar_t* l = slot + c * c;
          scalar_t* Q = work1.data();
          scalar_t* M = work2.data();
          scalar_t* R1 = work3.data();
          scalar_t* R2 = work4.data();
          // V Xc: applies dA without forming it, and refines recomputed eigenvalues as the forward did.
          const bool project = via_eigenbasis || !saved;
          if (!saved) eigh[0](A.const_data_ptr<scalar_t>() + b * c * c, std::isfinite(tr_b), own);
          if (project) gemm<scalar_t>(false, false, c, n, c, 1, V, c, xcp, n, 0, R2, n);  // U^T Xc
          if (!saved) {
            rayleigh_eigenvalues<scalar_t>(R2, rows_to_refine(own + c * c, c), n, tr_b, recovered_shift(), own + c * c);
          }

          // U^T dY U = V dY V^T. From C = 128 on as V (V dY)^T (dY is symmetric), the second product's lower
          // triangle only (gemm_lower), mirrored; at C = 64 the half product's four calls of MKL cost the backward
          // more than they save.
          if (lower_halves) {
            gemm<scalar_t>(false, false, c, c, c, 1, V, c, dy, c, 0, Q, c);
            gemm_lower<scalar_t>(c, c, 1, V, Q, c, M, c);
            mirror(M, c, true);
          } else {
            gemm<scalar_t>(false, true, c, c, c, 1, dy, c, V, c, 0, Q, c);
            gemm<scalar_t>(false, false, c, c, c, 1, V, c, Q, c, 0, M, c);
          }

          scalar_t* ys = traj.data();
          scalar_t* zs = ys + iters * c;
          scalar_t* ts = zs + iters * c;
          trajectories<scalar_t>(l, c, iters, ys, zs, ts, p.data());
          for (int64_t i = 0; i < c; ++i) grad_out += static_cast<double>(p[i]) * M[i * (c + 1)];  // <dY, Y>, (16)
          dA_dot_A = scale_by_divided_differences<scalar_t>(M, l, c, iters, ys, zs, ts, ddy.data(), ddz.data());

          if (via_eigenbasis) {
            gemm<scalar_t>(false, false, c, n, c, 1, M, c, R2, n, 0, R1, n);
            gemm<scalar_t>(true, false, c, n, c, 1, V, c, R1, n, 0, R2, n);  // dA Xc
            pp = R2;
          } else {
            gemm<scalar_t>(false, false, c, c, c, 1, M, c, V, c, 0, Q, c);
            if (lower_halves) {  // dA = V^T (M V): its lower triangle, mirrored
              gemm_lower_tn<scalar_t>(c, c, 1, V, Q, c, dy, c);
              mirror(dy, c, true);
            } else {
              gemm<scalar_t>(true, false, c, c, c, 1, V, c, Q, c, 0, dy, c);
            }
            gemm<scalar_t>(false, false, c, n, c, 1, dy, c, xcp, n, 0, R1, n);
            pp = R1;
          }
        }
        const double coef = dA_dot_A - 0.5 * grad_out;

        const scalar_t s2coef = static_cast<scalar_t>(coef) * static_cast<scalar_t>(2.0 / (n * tr_b));
        const scalar_t s2p = static_cast<scalar_t>(2.0 * dscale / (n * tr_b));
        const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * x.stride(0);
        scalar_t* dxb = dx.mutable_data_ptr<scalar_t>() + b * dx.stride(0);
        const scalar_t* wb = w ? w + b * w_sb : nullptr;
        if (wb) std::fill(dw_acc.begin(), dw_acc.end(), 0.0);
        scalar_t* dxw = dxw_row.data();
        for (int64_t ci = 0; ci < c; ++ci) {
          const scalar_t* prow = pp + ci * n;
          const scalar_t* crow = xcp + ci * n;
          for (int64_t ni = 0; ni < n; ++ni) dxw[ni] = s2p * prow[ni] - s2coef * crow[ni];
          // The centring's own backward, docs/math.md (14): subtract the row mean of dXc. It is zero in exact
          // arithmetic (Xc 1 = 0) but not in floating point when the features' mean is large against their
          // spread, where leaving it out costs digits that autograd through the reference keeps.
          const scalar_t row_mean = static_cast<scalar_t>(sum_as_double(dxw, n) / n);
          for (int64_t ni = 0; ni < n; ++ni) dxw[ni] -= row_mean;
          scalar_t* drow = dxb + ci * ds1;
          const scalar_t* xrow = xb + ci * xs1;
          if (ds2 == 1 && xs2 == 1 && w_sn == 1) {  // contiguous rows: loops the compiler vectorises
            if (wb) {
              for (int64_t ni = 0; ni < n; ++ni) drow[ni] = dxw[ni] * wb[ni];
              for (int64_t ni = 0; ni < n; ++ni) dw_acc[ni] += static_cast<double>(dxw[ni]) * xrow[ni];
            } else {
              std::copy(dxw, dxw + n, drow);
            }
          } else {
            for (int64_t ni = 0; ni < n; ++ni) {
              if (wb) {
                drow[ni * ds2] = dxw[ni] * wb[ni * w_sn];
                dw_acc[ni] += static_cast<double>(dxw[ni]) * xrow[ni * xs2];
              } else {
                drow[ni * ds2] = dxw[ni];
              }
            }
          }
        }
        if (wb) {
          scalar_t* dwb = dw.mutable_data_ptr<scalar_t>() + b * dw.stride(0);
          const int64_t dws = dw.stride(1);
          for (int64_t ni = 0; ni < n; ++ni) dwb[ni * dws] = static_cast<scalar_t>(dw_acc[ni]);
        }
      }
    });
  });
  return {dx, dw};
}

}  // namespace

// The variant's entry points (cpu_variants.h): the ops' kernels, and its own solver's largest size.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x, const std::optional<Tensor>& weight, int64_t iters,
                                                   double eps, c10::string_view order, bool keep_iterates,
                                                   c10::string_view precision) {
  return forward_cpu(x, weight, iters, eps, order, keep_iterates, precision);
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& weight,
                                    const Tensor& out, const Tensor& A, const Tensor& tr, const Tensor& iterates,
                                    int64_t iters, c10::string_view order, c10::string_view precision) {
  return backward_cpu(grad, x, weight, out, A, tr, iterates, iters, order, precision);
}

int64_t small_eigh_max(bool float64) { return float64 ? kSmallEighMaxDouble : kSmallEighMaxFloat; }

}  // namespace THREEG_CPU_VARIANT
}  // namespace threeg
