// The symmetric eigendecomposition of the ext CPU backend for small matrices (docs/ext.md, "Eigensolver").
//
// A = Q T Q^T by Householder reflections (T tridiagonal), then T = Z diag(l) Z^T by the implicit QL iteration with
// Wilkinson shifts, its plane rotations applied to the rows of Q^T (at once, or recorded and applied after the
// iteration: below), so that V = Z^T Q^T comes out with row i the i-th eigenvector. Every step is a loop over
// contiguous rows of at most n elements: for n up to a few hundred the matrix stays in the core's caches, where
// LAPACK's syevd spends most of its time in calls to general BLAS-2 kernels and in the set-up of its
// divide-and-conquer stage (crossover measured in docs/ext.md).
//
// A group of up to kGroup matrices is solved together: each QL iteration is a chain of dependent scalar operations
// (a square root, a division and four products a rotation, ~45 cycles), so one matrix leaves the core mostly
// idle. The group's chains are advanced a rotation each in turn, which lets the core overlap them; their rotations
// are recorded and applied afterwards, a sweep at a time in column blocks that keep the carried row in registers
// (one load and one store a rotation, where applying each rotation at once loads and stores two rows). A group
// of one applies each rotation at once: there the rows' updates overlap the chain's latency instead.
//
// Storage: `a` row-major n x n, both triangles, read only; `v` (n x n, row-major) receives the eigenvectors as
// rows, `l` (n) the eigenvalues in ascending order, as syevd gives them. A matrix whose QL iteration has not
// converged after 30 sweeps for one eigenvalue (or that was not finite) is reported as failed; its `v` and `l`
// are then undefined.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// Part of the CPU kernels (kernels.h), compiled once per instruction set into the variant's namespace: the loops
// vectorise for AVX-512 / AVX2 where the CPU has them. The hot steps are forced inline into their callers.
#if !defined(THREEG_CPU_VARIANT) || !defined(THREEG_VECTOR_BYTES)
#error "small_eigh.h is part of kernels.h, included by a kernels_*.cpp variant (THREEG_CPU_VARIANT, THREEG_VECTOR_BYTES)"
#endif
#define THREEG_INLINE inline __attribute__((always_inline))

namespace threeg {
namespace THREEG_CPU_VARIANT {
namespace small_eigh_detail {

// Rows are padded to a multiple of 16 elements (one AVX-512 register of float).
constexpr int64_t kLanes = 16;

// Rows x <- c x - s y, y <- s x + c y (the QL rotation of eigenvectors i and i + 1).
template <typename T>
THREEG_INLINE void rotate(T* __restrict x, T* __restrict y, T c, T s, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T xk = x[k], yk = y[k];
    x[k] = c * xk - s * yk;
    y[k] = s * xk + c * yk;
  }
}

// y += alpha x
template <typename T>
THREEG_INLINE void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

// out = sum_j alpha coef[j] row_j for `rows` rows of length n (stride ld), four rows per pass over `out`: one
// row per pass makes every pass wait for the previous one's stores.
template <typename T>
THREEG_INLINE void sum_rows(const T* __restrict rows_p, int64_t ld, const T* __restrict coef, T alpha,
                                 int64_t rows, int64_t n, T* __restrict out) {
  std::fill(out, out + n, T(0));
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const T c0 = alpha * coef[j], c1 = alpha * coef[j + 1], c2 = alpha * coef[j + 2], c3 = alpha * coef[j + 3];
    const T *r0 = rows_p + j * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
    for (int64_t k = 0; k < n; ++k) out[k] += (c0 * r0[k] + c1 * r1[k]) + (c2 * r2[k] + c3 * r3[k]);
  }
  for (; j < rows; ++j) axpy(alpha * coef[j], rows_p + j * ld, out, n);
}

template <typename T>
THREEG_INLINE T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // four chains: one is latency-bound
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += x[k] * y[k];
    s1 += x[k + 1] * y[k + 1];
    s2 += x[k + 2] * y[k + 2];
    s3 += x[k + 3] * y[k + 3];
  }
  for (; k < n; ++k) s0 += x[k] * y[k];
  return (s0 + s1) + (s2 + s3);
}

// S <- S - ui w^T - wi u^T on one row (step k's rank-2 update of the trailing block, row by row).
template <typename T>
THREEG_INLINE void update_row(T* __restrict row, const T* __restrict u, const T* __restrict w, T ui, T wi,
                              int64_t j0, int64_t ld) {
  for (int64_t j = j0; j < ld; ++j) row[j] -= ui * w[j] + wi * u[j];
}

// Four trailing rows r0 .. r3 (stride ld) brought up to date by the previous step's update (up, wp: their entries of
// u and w) and added into out with the coefficients c, in one pass: the update and the product of the next step
// would otherwise read the trailing block twice a step.
template <typename T>
THREEG_INLINE void fused_rows(T* __restrict r0, int64_t ld, const T* __restrict u, const T* __restrict w,
                              const T* __restrict c, const T* __restrict up, const T* __restrict wp, T* __restrict out,
                              int64_t j0, int64_t len) {
  T* __restrict r1 = r0 + ld;
  T* __restrict r2 = r1 + ld;
  T* __restrict r3 = r2 + ld;
  const T u0 = up[0], u1 = up[1], u2 = up[2], u3 = up[3];
  const T w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3];
  const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  for (int64_t j = j0; j < len; ++j) {
    const T uj = u[j], wj = w[j];
    const T y0 = r0[j] - (u0 * wj + w0 * uj), y1 = r1[j] - (u1 * wj + w1 * uj);
    const T y2 = r2[j] - (u2 * wj + w2 * uj), y3 = r3[j] - (u3 * wj + w3 * uj);
    r0[j] = y0;
    r1[j] = y1;
    r2[j] = y2;
    r3[j] = y3;
    out[j] += (c0 * y0 + c1 * y1) + (c2 * y2 + c3 * y3);
  }
}

// Householder tridiagonalisation A = Q T Q^T (the lower-triangle convention of LAPACK's sytrd): reflector k,
// H_k = I - tau_k u u^T with u = (0 .. 0, 1, v) starting at row k + 1, maps row k's part right of the diagonal
// onto e_k times the first unit vector. Both triangles of the trailing block are kept, so row k is column k and
// every update runs along rows. `a`: n x n in rows of stride ld (a multiple of the vector width, padding zero):
// the updates run from the vector-aligned column at or left of k + 1 to ld, where u and w are zero outside
// k + 1 .. n - 1, so no loop has a scalar remainder. d, e: T's diagonal and off-diagonal (e[k] couples k and
// k + 1); row k of `a` keeps u right of position k, tau[k] the scalar; p, u, w: scratch of ld.
//
// Step k's product p = tau S u needs the trailing rows as step k - 1's rank-2 update leaves them: the update is
// applied to row k first (its reflector comes from it), then to the other rows in the pass that forms p
// (fused_rows), the update left pending until then. The same operations in the same order as an update pass
// followed by a product pass, so the results are equal bit for bit (one pass reads the trailing block once).
template <typename T>
THREEG_INLINE void tridiagonalise(T* a, int64_t n, int64_t ld, T* d, T* e, T* tau, T* p, T* u, T* w) {
  std::fill(u, u + ld, T(0));
  std::fill(w, w + ld, T(0));
  bool pending = false;  // step k - 1's (u, w) not yet applied to rows k ..
  for (int64_t k = 0; k + 2 < n; ++k) {
    T* x = a + k * ld;  // row k = column k
    const int64_t j0 = (k + 1) / kLanes * kLanes;  // rows below k are read from column k + 1 on, row k from k
    if (pending) update_row(x, u, w, u[k], w[k], k / kLanes * kLanes, ld);
    d[k] = x[k];
    const T alpha = x[k + 1];
    const T sigma = dot(x + k + 2, x + k + 2, n - k - 2);
    if (sigma == T(0)) {  // already tridiagonal in this column: no reflection; the trailing rows catch up
      tau[k] = 0;
      e[k] = alpha;
      if (pending) {
        for (int64_t i = k + 1; i < n; ++i) update_row(a + i * ld, u, w, u[i], w[i], j0, ld);
      }
      pending = false;
      continue;
    }
    const T norm = std::sqrt(alpha * alpha + sigma);
    const T beta = alpha > T(0) ? -norm : norm;
    const T t = (beta - alpha) / beta;
    const T scale = T(1) / (alpha - beta);
    x[k + 1] = 1;
    for (int64_t j = k + 2; j < n; ++j) x[j] *= scale;
    tau[k] = t;
    e[k] = beta;
    // p = tau S u over the trailing rows (columns left of k + 1 get values never read); u is row k right of k
    std::fill(p + j0, p + ld, T(0));
    int64_t i = k + 1;
    if (pending) {
      for (; i + 4 <= n; i += 4) {
        const T c[4] = {t * x[i], t * x[i + 1], t * x[i + 2], t * x[i + 3]};
        fused_rows(a + i * ld, ld, u, w, c, u + i, w + i, p, j0, ld);
      }
      for (; i < n; ++i) {
        update_row(a + i * ld, u, w, u[i], w[i], j0, ld);
        axpy(t * x[i], a + i * ld + j0, p + j0, ld - j0);
      }
    } else {
      sum_rows(a + (k + 1) * ld + j0, ld, x + k + 1, t, n - k - 1, ld - j0, p + j0);
    }
    u[k] = 0;
    std::copy(x + k + 1, x + n, u + k + 1);
    const T half = T(0.5) * t * dot(p + k + 1, u + k + 1, n - k - 1);
    for (int64_t j = k + 1; j < n; ++j) w[j] = p[j] - half * u[j];
    for (int64_t j = j0; j <= k; ++j) w[j] = 0;
    pending = true;
  }
  if (pending) {  // the last step's update of the two rows left, read from column n - 2 on
    const int64_t j0 = (n - 2) / kLanes * kLanes;
    for (int64_t i = n - 2; i < n; ++i) update_row(a + i * ld, u, w, u[i], w[i], j0, ld);
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * ld + n - 2];
    e[n - 2] = a[(n - 1) * ld + n - 2];
  }
  d[n - 1] = a[(n - 1) * ld + n - 1];
  e[n - 1] = 0;
}

// Q^T (n x n in rows of stride ld, into qt) from the reflectors tridiagonalise left in `a`: Q = H_0 ... H_{n-3}
// accumulated from the last, Q <- H_k Q on rows k + 1 .., then transposed. Columns left of k + 1 of those rows
// are zero at step k, so the aligned start adds zeros. q: n x ld scratch; u, y: ld scratch.
// (Forming Q^T row by row instead, M <- M H_k, needs a dot product per row before its update: 4x slower at
// n = 64 to 128.)
template <typename T>
THREEG_INLINE void form_qt(const T* a, const T* tau, int64_t n, int64_t ld, T* q, T* u, T* y, T* qt) {
  std::fill(q, q + n * ld, T(0));
  for (int64_t i = 0; i < n; ++i) q[i * ld + i] = 1;
  for (int64_t k = n - 3; k >= 0; --k) {
    if (tau[k] == T(0)) continue;
    const T* x = a + k * ld;
    const int64_t j0 = (k + 1) / kLanes * kLanes, len = ld - j0;
    std::copy(x + k + 1, x + n, u + k + 1);
    sum_rows(q + (k + 1) * ld + j0, ld, u + k + 1, T(1), n - k - 1, len, y + j0);  // y^T = u^T Q
    for (int64_t i = k + 1; i < n; ++i) axpy(-tau[k] * u[i], y + j0, q + i * ld + j0, len);
  }
  // The transpose in kLanes x kLanes tiles (ld is a multiple of kLanes; the padding is zero in both).
  for (int64_t i0 = 0; i0 < ld; i0 += kLanes) {
    for (int64_t j0 = 0; j0 < ld; j0 += kLanes) {
      T tile[kLanes][kLanes];
      for (int64_t i = 0; i < kLanes && i0 + i < n; ++i)
        for (int64_t j = 0; j < kLanes; ++j) tile[j][i] = q[(i0 + i) * ld + j0 + j];
      for (int64_t j = 0; j < kLanes && j0 + j < n; ++j)
        for (int64_t i = 0; i < kLanes; ++i) qt[(j0 + j) * ld + i0 + i] = i0 + i < n ? tile[j][i] : T(0);
    }
  }
}

// The implicit QL iteration with Wilkinson shifts on T (d, e), one plane rotation (or one sweep's set-up) per
// step(), so that the chains of several matrices can be interleaved. Each rotation acts on rows i, i + 1 of the
// eigenvector rows vt (n rows of stride ld): at once (Record = false) or recorded as (c, s) with the sweeps' rows
// for apply_rotations. Once step() returns false, d holds the eigenvalues (unsorted) and the rows (after
// apply_rotations) the matching eigenvectors, unless failed().
template <typename T>
class QLChain {
 public:
  void start(T* d, T* e, T* vt, int64_t n, int64_t ld) {
    d_ = d;
    e_ = e;
    vt_ = vt;
    n_ = n;
    ld_ = ld;
    l_ = 0;
    i_ = -1;
    sweep_ = 0;
    failed_ = false;
    rotations_.clear();
    sweeps_.clear();
  }

  bool failed() const { return failed_; }

  // False once every eigenvalue has converged, or when one has not after 30 sweeps (EISPACK's limit; failed()).
  template <bool Record>
  THREEG_INLINE bool step() {
    T *d = d_, *e = e_;
    if (i_ >= l_) {  // within a sweep: the rotation at i chases the bulge one row up, from m towards l
      const int64_t i = i_;
      const T f = s_ * e[i], b = c_ * e[i];
      T r = std::sqrt(f * f + g_ * g_);  // |f|, |g| <= ~2 |T|: no overflow for the inputs here
      e[i + 1] = r;
      if (r == T(0)) {  // underflow: T splits at i + 1; undo the shift's last part and sweep again
        d[i + 1] -= p_;
        e[m_] = 0;
        end_sweep<Record>(m_ - 1 - i);
        return true;
      }
      const T rinv = T(1) / r;  // one division on the iteration's critical path, not two
      s_ = f * rinv;
      c_ = g_ * rinv;
      g_ = d[i + 1] - p_;
      r = (d[i] - g_) * s_ + T(2) * c_ * b;
      p_ = s_ * r;
      d[i + 1] = g_ + p_;
      g_ = c_ * r - b;
      if constexpr (Record) {
        rotations_.push_back(c_);
        rotations_.push_back(s_);
      } else {
        rotate(vt_ + i * ld_, vt_ + (i + 1) * ld_, c_, s_, ld_);
      }
      if (--i_ < l_) {
        d[l_] -= p_;
        e[l_] = g_;
        e[m_] = 0;
        end_sweep<Record>(m_ - l_);
      }
      return true;
    }
    const T ulp = std::numeric_limits<T>::epsilon();
    int64_t m = l_;
    for (; m + 1 < n_; ++m) {  // the first negligible coupling at or below l splits T there
      const T dd = std::abs(d[m]) + std::abs(d[m + 1]);
      if (std::abs(e[m]) <= ulp * dd) break;
    }
    if (m == l_) {  // d[l] has converged
      sweep_ = 0;
      return ++l_ < n_;
    }
    if (sweep_++ >= 30) {
      failed_ = true;
      return false;
    }
    // Shift: the eigenvalue of T's leading 2 x 2 block at l nearer d[l]; g = d[m] - shift
    const int64_t l = l_;
    const T g = (d[l + 1] - d[l]) / (T(2) * e[l]);
    const T r = std::sqrt(g * g + T(1));
    g_ = d[m] - d[l] + e[l] / (g + std::copysign(r, g));
    s_ = 1;
    c_ = 1;
    p_ = 0;
    m_ = m;
    i_ = m - 1;
    if constexpr (Record) sweeps_.push_back(m);
    return true;
  }

  // The recorded rotations, applied to vt in column blocks of W vectors: for each sweep, row m is carried in
  // registers from rotation to rotation (rotation i makes row i + 1 final and leaves the new row i to carry).
  THREEG_INLINE void apply_rotations() {
    int64_t k0 = 0;
    for (; k0 + 4 * kVector <= ld_; k0 += 4 * kVector) apply_block<4>(k0);
    for (; k0 < ld_; k0 += kVector) apply_block<1>(k0);
  }

 private:
  // One vector register of the variant's instruction set (64 bytes for AVX-512, 32 for AVX2, 16 for SSE2): the
  // four carried in apply_block<4> and their operands stay in registers on each (wider blocks spill).
  static constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));

  template <bool Record>
  THREEG_INLINE void end_sweep(int64_t count) {
    i_ = -1;
    if constexpr (Record) sweeps_.push_back(count);
  }

  template <int W>
  THREEG_INLINE void apply_block(int64_t k0) {
    const T* rot = rotations_.data();
    for (size_t q = 0; q < sweeps_.size(); q += 2) {
      const int64_t m = sweeps_[q], count = sweeps_[q + 1];
      T* row = vt_ + m * ld_ + k0;
      Vec y[W];
      for (int w = 0; w < W; ++w) __builtin_memcpy(&y[w], row + w * kVector, sizeof(Vec));
      for (int64_t t = 0; t < count; ++t) {
        const T c = rot[2 * t], s = rot[2 * t + 1];
        T* x = row - ld_;
        for (int w = 0; w < W; ++w) {
          Vec xw;
          __builtin_memcpy(&xw, x + w * kVector, sizeof(Vec));
          const Vec out = s * xw + c * y[w];
          y[w] = c * xw - s * y[w];
          __builtin_memcpy(row + w * kVector, &out, sizeof(Vec));
        }
        row = x;
      }
      for (int w = 0; w < W; ++w) __builtin_memcpy(row + w * kVector, &y[w], sizeof(Vec));
      rot += 2 * count;
    }
  }

  T *d_ = nullptr, *e_ = nullptr, *vt_ = nullptr;
  int64_t n_ = 0, ld_ = 0, l_ = 0, m_ = 0, i_ = -1;
  int sweep_ = 0;
  bool failed_ = false;
  T s_ = 1, c_ = 1, p_ = 0, g_ = 0;
  std::vector<T> rotations_;      // (c, s) of each recorded rotation, in order
  std::vector<int64_t> sweeps_;  // per recorded sweep: m and its number of rotations (at i = m - 1 .. m - count)
};

}  // namespace small_eigh_detail

// The most matrices solved together (see the top of this file): enough chains to fill the core's latency.
constexpr int kGroup = 4;

// Scratch of one thread for up to kGroup matrices of size n: reused across samples (no allocation per call).
template <typename T>
class SmallEigh {
 public:
  explicit SmallEigh(int64_t n)
      : n_(n),
        ld_((n + small_eigh_detail::kLanes - 1) / small_eigh_detail::kLanes * small_eigh_detail::kLanes),
        a_(kGroup * n * ld_),
        q_(n * ld_),
        vt_(kGroup * n * ld_),
        vec_(kGroup * (3 * n + 3 * ld_)),
        order_(n),
        chains_(kGroup) {}

  // For j < g <= kGroup: a[j] row-major n x n symmetric (both triangles; read only) into v[j] (n x n, rows =
  // eigenvectors) and l[j] (ascending); ok[j] says whether that matrix converged.
  THREEG_INLINE void operator()(int g, const T* const* a, T* const* v, T* const* l, bool* ok) {
    using namespace small_eigh_detail;
    const int64_t n = n_, ld = ld_;
    bool live[kGroup];
    int alive = 0;
    for (int j = 0; j < g; ++j) {
      T* aj = a_.data() + j * n * ld;
      T *d = vec(j), *e = d + n, *tau = e + n, *p = tau + n, *u = p + ld, *w = u + ld;
      live[j] = ok[j] = copy_finite(a[j], aj);
      if (!ok[j]) continue;
      tridiagonalise(aj, n, ld, d, e, tau, p, u, w);
      std::fill(u, u + ld, T(0));
      form_qt(aj, tau, n, ld, q_.data(), u, p, vt(j));
      chains_[j].start(d, e, vt(j), n, ld);
      ++alive;
    }
    if (g == 1) {
      if (live[0]) while (chains_[0].template step<false>()) {}
    } else {
      while (alive > 0) {
        for (int j = 0; j < g; ++j) {
          if (live[j] && !chains_[j].template step<true>()) {
            live[j] = false;
            --alive;
          }
        }
      }
    }
    for (int j = 0; j < g; ++j) {
      if (!ok[j]) continue;
      if (chains_[j].failed()) {
        ok[j] = false;
        continue;
      }
      if (g > 1) chains_[j].apply_rotations();
      const T* d = vec(j);
      const T* rows = vt(j);
      for (int64_t i = 0; i < n; ++i) order_[i] = i;
      std::sort(order_.begin(), order_.end(), [&](int64_t x, int64_t y) { return d[x] < d[y]; });
      for (int64_t i = 0; i < n; ++i) {
        l[j][i] = d[order_[i]];
        std::copy(rows + order_[i] * ld, rows + order_[i] * ld + n, v[j] + i * n);
      }
    }
  }

 private:
  T* vec(int j) { return vec_.data() + j * (3 * n_ + 3 * ld_); }
  T* vt(int j) { return vt_.data() + j * n_ * ld_; }

  // a into the padded rows of `to` (zeros past n); false if an entry is not finite.
  bool copy_finite(const T* a, T* to) const {
    const int64_t n = n_, ld = ld_;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (!std::isfinite(a[i * n + j])) return false;
        to[i * ld + j] = a[i * n + j];
      }
      std::fill(to + i * ld + n, to + (i + 1) * ld, T(0));
    }
    return true;
  }

  int64_t n_, ld_;
  std::vector<T> a_, q_, vt_, vec_;
  std::vector<int64_t> order_;
  std::vector<small_eigh_detail::QLChain<T>> chains_;
};

}  // namespace THREEG_CPU_VARIANT
}  // namespace threeg
