// The symmetric eigendecomposition of the ext CPU backend for small matrices (docs/ext.md, "Eigensolver").
//
// A = Q T Q^T by Householder reflections (T tridiagonal), then T = Z diag(l) Z^T by the implicit QL iteration with
// Wilkinson shifts, its plane rotations applied straight to the rows of Q^T, so that V = Z^T Q^T comes out with
// row i the i-th eigenvector. Every step is a loop over contiguous rows of at most n elements: for n up to a few
// hundred the matrix stays in the core's caches, where LAPACK's syevd spends most of its time in calls to
// general BLAS-2 kernels and in the set-up of its divide-and-conquer stage (crossover measured in docs/ext.md).
//
// Storage: `a` row-major n x n, both triangles, read only; `v` (n x n, row-major) receives the eigenvectors as
// rows, `l` (n) the eigenvalues in ascending order, as syevd gives them. Returns false when the QL iteration has
// not converged after 30 sweeps for one eigenvalue (or the input was not finite); `v` and `l` are then undefined.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// Everything is inlined into the caller, which is compiled once per instruction set (target_clones): the loops
// then vectorise for AVX-512 / AVX2 where the CPU has them.
#define THREEG_EIGH_INLINE inline __attribute__((always_inline))

namespace threeg {
namespace small_eigh_detail {

// Rows are padded to a multiple of 16 elements (one AVX-512 register of float).
constexpr int64_t kLanes = 16;

// Rows x <- c x - s y, y <- s x + c y (the QL rotation of eigenvectors i and i + 1).
template <typename T>
THREEG_EIGH_INLINE void rotate(T* __restrict x, T* __restrict y, T c, T s, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T xk = x[k], yk = y[k];
    x[k] = c * xk - s * yk;
    y[k] = s * xk + c * yk;
  }
}

// y += alpha x
template <typename T>
THREEG_EIGH_INLINE void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

// out = sum_j alpha coef[j] row_j for `rows` rows of length n (stride ld), four rows per pass over `out`: one
// row per pass makes every pass wait for the previous one's stores.
template <typename T>
THREEG_EIGH_INLINE void sum_rows(const T* __restrict rows_p, int64_t ld, const T* __restrict coef, T alpha,
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
THREEG_EIGH_INLINE T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
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

// Householder tridiagonalisation A = Q T Q^T (the lower-triangle convention of LAPACK's sytrd): reflector k,
// H_k = I - tau_k u u^T with u = (0 .. 0, 1, v) starting at row k + 1, maps row k's part right of the diagonal
// onto e_k times the first unit vector. Both triangles of the trailing block are kept, so row k is column k and
// every update runs along rows. `a`: n x n in rows of stride ld (a multiple of the vector width, padding zero):
// the updates run from the vector-aligned column at or left of k + 1 to ld, where u and w are zero outside
// k + 1 .. n - 1, so no loop has a scalar remainder. d, e: T's diagonal and off-diagonal (e[k] couples k and
// k + 1); row k of `a` keeps u right of position k, tau[k] the scalar; p, u, w: scratch of ld.
template <typename T>
THREEG_EIGH_INLINE void tridiagonalise(T* a, int64_t n, int64_t ld, T* d, T* e, T* tau, T* p, T* u, T* w) {
  std::fill(u, u + ld, T(0));
  std::fill(w, w + ld, T(0));
  for (int64_t k = 0; k + 2 < n; ++k) {
    T* x = a + k * ld;  // row k = column k
    d[k] = x[k];
    const T alpha = x[k + 1];
    const T sigma = dot(x + k + 2, x + k + 2, n - k - 2);
    if (sigma == T(0)) {  // already tridiagonal in this column: no reflection
      tau[k] = 0;
      e[k] = alpha;
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
    const int64_t j0 = (k + 1) / kLanes * kLanes, len = ld - j0;
    u[k] = 0;
    std::copy(x + k + 1, x + n, u + k + 1);
    // p = tau S u over the trailing rows (columns left of k + 1 get values never read)
    sum_rows(a + (k + 1) * ld + j0, ld, u + k + 1, t, n - k - 1, len, p + j0);
    const T half = T(0.5) * t * dot(p + k + 1, u + k + 1, n - k - 1);
    for (int64_t j = k + 1; j < n; ++j) w[j] = p[j] - half * u[j];
    for (int64_t j = j0; j <= k; ++j) w[j] = 0;
    for (int64_t i = k + 1; i < n; ++i) {  // S <- S - u w^T - w u^T
      T* row = a + i * ld;
      const T ui = u[i], wi = w[i];
      for (int64_t j = j0; j < ld; ++j) row[j] -= ui * w[j] + wi * u[j];
    }
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
template <typename T>
THREEG_EIGH_INLINE void form_qt(const T* a, const T* tau, int64_t n, int64_t ld, T* q, T* u, T* y, T* qt) {
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
  std::fill(qt, qt + n * ld, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) qt[j * ld + i] = q[i * ld + j];
}

// The implicit QL iteration with Wilkinson shifts on T (d, e), each plane rotation applied to rows i, i + 1 of
// vt (n rows of stride ld). On return d holds the eigenvalues (unsorted), vt's rows the matching eigenvectors.
template <typename T>
THREEG_EIGH_INLINE bool tridiagonal_ql(T* d, T* e, T* vt, int64_t n, int64_t ld) {
  const T ulp = std::numeric_limits<T>::epsilon();
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t sweep = 0;; ++sweep) {
      int64_t m = l;
      for (; m + 1 < n; ++m) {  // the first negligible coupling at or below l splits T there
        const T dd = std::abs(d[m]) + std::abs(d[m + 1]);
        if (std::abs(e[m]) <= ulp * dd) break;
      }
      if (m == l) break;
      if (sweep >= 30) return false;  // 30 sweeps for one eigenvalue (EISPACK's limit); the caller falls back
      // Shift: the eigenvalue of T's leading 2 x 2 block at l nearer d[l]; g = d[m] - shift
      T g = (d[l + 1] - d[l]) / (T(2) * e[l]);
      T r = std::sqrt(g * g + T(1));
      g = d[m] - d[l] + e[l] / (g + std::copysign(r, g));
      T s = 1, c = 1, p = 0;
      bool split = false;
      for (int64_t i = m - 1; i >= l; --i) {  // chase the bulge up from m to l
        const T f = s * e[i], b = c * e[i];
        r = std::sqrt(f * f + g * g);  // |f|, |g| <= ~2 |T|: no overflow for the inputs here
        e[i + 1] = r;
        if (r == T(0)) {  // underflow: T splits at i + 1; undo the shift's last part and sweep again
          d[i + 1] -= p;
          e[m] = 0;
          split = true;
          break;
        }
        const T rinv = T(1) / r;  // one division on the iteration's critical path, not two
        s = f * rinv;
        c = g * rinv;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + T(2) * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        rotate(vt + i * ld, vt + (i + 1) * ld, c, s, ld);
      }
      if (split) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0;
    }
  }
  return true;
}

}  // namespace small_eigh_detail

// Scratch of one thread for matrices of size n: reused across samples (no allocation per call).
template <typename T>
class SmallEigh {
 public:
  explicit SmallEigh(int64_t n)
      : n_(n),
        ld_((n + small_eigh_detail::kLanes - 1) / small_eigh_detail::kLanes * small_eigh_detail::kLanes),
        a_(n * ld_),
        q_(n * ld_),
        vt_(n * ld_),
        vec_(3 * n + 3 * ld_),
        order_(n) {}

  // a: row-major n x n symmetric (both triangles; read only). v: n x n, rows = eigenvectors; l: ascending.
  THREEG_EIGH_INLINE bool operator()(const T* a, T* v, T* l) {
    using namespace small_eigh_detail;
    const int64_t n = n_, ld = ld_;
    T *d = vec_.data(), *e = d + n, *tau = e + n, *p = tau + n, *u = p + ld, *w = u + ld;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (!std::isfinite(a[i * n + j])) return false;
        a_[i * ld + j] = a[i * n + j];
      }
      std::fill(a_.data() + i * ld + n, a_.data() + (i + 1) * ld, T(0));
    }
    tridiagonalise(a_.data(), n, ld, d, e, tau, p, u, w);
    std::fill(u, u + ld, T(0));
    form_qt(a_.data(), tau, n, ld, q_.data(), u, p, vt_.data());
    if (!tridiagonal_ql(d, e, vt_.data(), n, ld)) return false;
    for (int64_t i = 0; i < n; ++i) order_[i] = i;
    std::sort(order_.begin(), order_.end(), [&](int64_t x, int64_t y) { return d[x] < d[y]; });
    for (int64_t i = 0; i < n; ++i) {
      l[i] = d[order_[i]];
      std::copy(vt_.data() + order_[i] * ld, vt_.data() + order_[i] * ld + n, v + i * n);
    }
    return true;
  }

 private:
  int64_t n_, ld_;
  std::vector<T> a_, q_, vt_, vec_;
  std::vector<int64_t> order_;
};

}  // namespace threeg
