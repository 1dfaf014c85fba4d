// The symmetric eigendecomposition of the ext CPU backend for small matrices (docs/ext.md, "Eigensolver").
//
// A = Q T Q^T by Householder reflections (T tridiagonal), then T = Z diag(l) Z^T by the implicit QL iteration with
// Wilkinson shifts, its plane rotations applied to the rows of Q^T (at once, or recorded and applied after the
// iteration: below), so that V = Z^T Q^T comes out with row i the i-th eigenvector. Every step is a loop over
// contiguous rows of at most n elements: for n up to a few hundred the matrix stays in the core's caches, where
// LAPACK's syevd spends most of its time in calls to general BLAS-2 kernels and in the set-up of its
// divide-and-conquer stage (crossover measured in docs/ext.md).
//
// A group of up to kGroup matrices is solved together: each QL iteration is a chain of dependent operations (a
// square root, a division and four products a rotation, ~50 cycles), so one matrix leaves the core mostly idle.
// The group's iterations run in lockstep, one matrix a vector lane (QLChain::run_lockstep), so that one vector
// instruction does the same step of every chain; their rotations are recorded and applied afterwards, two sweeps
// at a time in column blocks that keep the carried rows in registers (one load and one store a row for both
// sweeps, where applying each rotation at once loads and stores two rows). A group of one applies each rotation
// at once (QLChain::step): there the rows' updates overlap the chain's latency.
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
#include <new>
#include <utility>
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

// Scratch storage whose elements start uninitialised (std::vector<T> zeroes them: for the kernels' per-call
// buffers that was a memset of ~650 KB a thread a call at C = 64, B = 16, ~2% of the forward), for buffers every
// element of which is written before it is read; aligned to 64 bytes, so that the rows of stride ld (a multiple of 16
// elements) start on a cache line. With operator new's 16 bytes every AVX-512 load and store of a row spanned two
// lines: the eigensolver took 12-15% longer at n = 64 to 256 (float32; docs/ext.md, "Per-call cost").
template <typename T>
struct DefaultInit : std::allocator<T> {
  static constexpr std::size_t kAlign = 64;
  template <typename U>
  struct rebind {
    using other = DefaultInit<U>;
  };
  DefaultInit() = default;
  template <typename U>
  DefaultInit(const DefaultInit<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(kAlign)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kAlign)); }
};
template <typename T>
using Buffer = std::vector<T, DefaultInit<T>>;

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

// The lanes of v summed pairwise in registers: lane i + h onto lane i for h = half the lanes, a quarter, ... 1 (a
// shuffle and an add a stage), the same sums as through an array (bit for bit), without the store and the loads.
template <int kHalf, typename Vec, std::size_t... L>
THREEG_INLINE Vec fold_lanes(Vec v, std::index_sequence<L...>) {
  return v + __builtin_shufflevector(v, v, static_cast<int>((L + kHalf) % sizeof...(L))...);
}

template <int kHalf, typename Vec>
THREEG_INLINE auto sum_lanes(Vec v) {
  if constexpr (kHalf >= 1) {
    constexpr std::size_t kLane = sizeof(Vec) / sizeof(v[0]);
    return sum_lanes<kHalf / 2>(fold_lanes<kHalf>(v, std::make_index_sequence<kLane>()));
  } else {
    return v[0];
  }
}

// v <- the square root of each of its lanes (v a GCC vector of float or double): sqrtps / sqrtpd on each of its
// parts of one vector register of the variant (THREEG_VECTOR_BYTES), correctly rounded as std::sqrt is (whose
// errno branch keeps the compiler from vectorising a loop of it).
template <typename Vec>
THREEG_INLINE void lane_sqrt(Vec& v) {
  typedef decltype(v[0] + 0) T;
  constexpr std::size_t kBytes = sizeof(Vec) < THREEG_VECTOR_BYTES ? sizeof(Vec) : THREEG_VECTOR_BYTES;
  typedef T Part __attribute__((vector_size(kBytes)));
  for (std::size_t k = 0; k < sizeof(Vec); k += kBytes) {
    Part x;
    __builtin_memcpy(&x, reinterpret_cast<const char*>(&v) + k, kBytes);
    if constexpr (kBytes == 16 && sizeof(T) == 4) {
      x = (Part)_mm_sqrt_ps((__m128)x);
    } else if constexpr (kBytes == 16) {
      x = (Part)_mm_sqrt_pd((__m128d)x);
#if THREEG_VECTOR_BYTES >= 32
    } else if constexpr (kBytes == 32 && sizeof(T) == 4) {
      x = (Part)_mm256_sqrt_ps((__m256)x);
    } else if constexpr (kBytes == 32) {
      x = (Part)_mm256_sqrt_pd((__m256d)x);
#endif
#if THREEG_VECTOR_BYTES >= 64
    } else if constexpr (sizeof(T) == 4) {
      x = (Part)_mm512_sqrt_ps((__m512)x);
    } else {
      x = (Part)_mm512_sqrt_pd((__m512d)x);
#endif
    }
    __builtin_memcpy(reinterpret_cast<char*>(&v) + k, &x, kBytes);
  }
}

// Whether any lane of the vector comparison result m is set.
template <typename Mask>
THREEG_INLINE bool any_lane(Mask m) {
  long long w[sizeof(Mask) / sizeof(long long)], any = 0;
  __builtin_memcpy(w, &m, sizeof(Mask));
  for (std::size_t k = 0; k < sizeof(Mask) / sizeof(long long); ++k) any |= w[k];
  return any != 0;
}

// x . y in vector registers (two accumulators), their lanes summed pairwise, the last n mod kVector products in
// four partial sums: four scalar chains run at a quarter of one vector register's throughput (per step of the
// tridiagonalisation, its two products of length n - k took as long as the whole update of the trailing block).
template <typename T>
THREEG_INLINE T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  Vec s0 = {}, s1 = {};
  int64_t k = 0;
  for (; k + 2 * kVector <= n; k += 2 * kVector) {
    Vec x0, y0, x1, y1;
    __builtin_memcpy(&x0, x + k, sizeof(Vec));
    __builtin_memcpy(&y0, y + k, sizeof(Vec));
    __builtin_memcpy(&x1, x + k + kVector, sizeof(Vec));
    __builtin_memcpy(&y1, y + k + kVector, sizeof(Vec));
    s0 += x0 * y0;
    s1 += x1 * y1;
  }
  if (k + kVector <= n) {
    Vec x0, y0;
    __builtin_memcpy(&x0, x + k, sizeof(Vec));
    __builtin_memcpy(&y0, y + k, sizeof(Vec));
    s0 += x0 * y0;
    k += kVector;
  }
  s0 += s1;
  T t[4] = {sum_lanes<kVector / 2>(s0), 0, 0, 0};
  for (int64_t i = 0; k < n; ++k, ++i) t[i & 3] += x[k] * y[k];
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// sum_{j >= k} x_j y_j of rows padded with zeros to ld (a multiple of the vector width): whole vectors from the
// aligned column at or left of k, the first one's lanes left of k masked off, so that no loop has a remainder of
// data-dependent length (two such loops a step cost the tridiagonalisation a mispredicted branch each).
template <typename T>
THREEG_INLINE T dot_from(const T* __restrict x, const T* __restrict y, int64_t k, int64_t ld) {
  constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  const int64_t a0 = k / kVector * kVector;
  Vec x0, y0, lane;
  __builtin_memcpy(&x0, x + a0, sizeof(Vec));
  __builtin_memcpy(&y0, y + a0, sizeof(Vec));
  for (int64_t l = 0; l < kVector; ++l) lane[l] = static_cast<T>(l);
  const Vec first = lane >= static_cast<T>(k - a0) ? x0 * y0 : Vec{};
  return sum_lanes<kVector / 2>(first) + dot(x + a0 + kVector, y + a0 + kVector, ld - a0 - kVector);
}

// S <- S - ui w^T - wi u^T on one row (step k's rank-2 update of the trailing block, row by row).
template <typename T>
THREEG_INLINE void update_row(T* __restrict row, const T* __restrict u, const T* __restrict w, T ui, T wi,
                              int64_t j0, int64_t ld) {
  for (int64_t j = j0; j < ld; ++j) row[j] = (row[j] - ui * w[j]) - wi * u[j];  // two fused multiply-adds
}

// kRows trailing rows from r0 (stride ld) brought up to date by the previous step's update (up, wp: their
// entries of u and w) and added into out with the coefficients c, in one pass: the update and the product of the
// next step would otherwise read the trailing block twice a step. Written as chains of fused multiply-adds (three a
// row). The tridiagonalisation passes eight rows at once where AVX-512's 32 registers hold their 24 coefficients
// (out read and written once per eight rows), four with AVX2 / SSE2, and the rest in fewer.
constexpr int kFusedRows = THREEG_VECTOR_BYTES == 64 ? 8 : 4;

template <int kRows, typename T>
THREEG_INLINE void fused_rows(T* __restrict r0, int64_t ld, const T* __restrict u, const T* __restrict w,
                              const T* __restrict c, const T* __restrict up, const T* __restrict wp, T* __restrict out,
                              int64_t j0, int64_t len) {
  T ur[kRows], wr[kRows], cr[kRows];
  for (int r = 0; r < kRows; ++r) {
    ur[r] = up[r];
    wr[r] = wp[r];
    cr[r] = c[r];
  }
  // j0 and len are multiples of kLanes, so of the vector width: the loop runs in whole vectors (the rows may alias
  // for all the compiler knows, so it would not vectorise this loop itself).
  constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  for (int64_t j = j0; j < len; j += kVector) {
    Vec uj, wj, o;
    __builtin_memcpy(&uj, u + j, sizeof(Vec));
    __builtin_memcpy(&wj, w + j, sizeof(Vec));
    __builtin_memcpy(&o, out + j, sizeof(Vec));
    for (int r = 0; r < kRows; ++r) {
      T* row = r0 + r * ld + j;
      Vec y;
      __builtin_memcpy(&y, row, sizeof(Vec));
      y = (y - ur[r] * wj) - wr[r] * uj;
      __builtin_memcpy(row, &y, sizeof(Vec));
      o += cr[r] * y;
    }
    __builtin_memcpy(out + j, &o, sizeof(Vec));
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
    const T sigma = dot_from(x, x, k + 2, ld);
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
      T c[kFusedRows];
      for (; i + kFusedRows <= n; i += kFusedRows) {
        for (int r = 0; r < kFusedRows; ++r) c[r] = t * x[i + r];
        fused_rows<kFusedRows>(a + i * ld, ld, u, w, c, u + i, w + i, p, j0, ld);
      }
      for (int rows = kFusedRows / 2; rows >= 1; rows /= 2) {
        if (i + rows > n) continue;
        for (int r = 0; r < rows; ++r) c[r] = t * x[i + r];
        if (rows == 4) fused_rows<4>(a + i * ld, ld, u, w, c, u + i, w + i, p, j0, ld);
        if (rows == 2) fused_rows<2>(a + i * ld, ld, u, w, c, u + i, w + i, p, j0, ld);
        if (rows == 1) fused_rows<1>(a + i * ld, ld, u, w, c, u + i, w + i, p, j0, ld);
        i += rows;
      }
    } else {
      sum_rows(a + (k + 1) * ld + j0, ld, x + k + 1, t, n - k - 1, ld - j0, p + j0);
    }
    u[k] = 0;
    std::copy(x + k + 1, x + n, u + k + 1);  // (u is zero past n, as dot_from needs; it masks what is left of k + 1)
    const T half = T(0.5) * t * dot_from(p, u, k + 1, ld);
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

// A square block of vector registers (row i in r[i]) transposed in place: log2(lanes) stages, each swapping the
// off-diagonal sub-blocks of one size (half the block, then a quarter, ...) between pairs of rows, two shuffles a
// pair.
template <int kSize, int kLane>
constexpr int swapped_source(int lane, bool upper) {
  return (lane & kSize) ? (upper ? kLane + lane : kLane + lane - kSize) : (upper ? lane + kSize : lane);
}

template <int kSize, typename Vec, std::size_t... L>
THREEG_INLINE void swap_sub_blocks(Vec& a, Vec& b, std::index_sequence<L...>) {
  constexpr int kLane = sizeof...(L);
  const Vec lower = __builtin_shufflevector(a, b, swapped_source<kSize, kLane>(L, false)...);
  const Vec upper = __builtin_shufflevector(a, b, swapped_source<kSize, kLane>(L, true)...);
  a = lower;
  b = upper;
}

template <int kSize, typename Vec>
THREEG_INLINE void transpose_block(Vec* r) {
  constexpr int kLane = sizeof(Vec) / sizeof(r[0][0]);
  if constexpr (kSize >= 1) {
    for (int i = 0; i < kLane; ++i) {
      if ((i & kSize) == 0) swap_sub_blocks<kSize>(r[i], r[i + kSize], std::make_index_sequence<kLane>());
    }
    transpose_block<kSize / 2>(r);
  }
}

// form_qt / FormQt: Q^T (n x n in rows of stride ld, into qt) from the reflectors tridiagonalise left in `a`, Q = H_0
// ... H_{n-3}, accumulated from the last in blocks of kReflectors, Q <- H_k0 ... H_k1 Q = (I - Y S Y^T) Q on rows k0 +
// 1 .. (Y's columns the block's u, S upper triangular: LAPACK's larft, forward), then transposed. Column block by
// column block of one vector register each (two at a time with AVX-512: apply_block_reflector), Y^T Q is summed in
// registers over the rows, S applied there, and the rows updated in a second pass while the column block is still in
// the L1 cache: kReflectors products per element loaded, where one reflector at a time makes two passes per reflector,
// each with one product per element (3 to 5 times slower at n = 64 to 128). Columns left of k0 + 1 of those rows are
// zero, so the aligned start adds zeros. q: n x ld scratch; yt: kReflectors x ld scratch (the block's Y^T).
constexpr int kReflectors = 8;  // 8 sums and their operands fit the 16 vector registers of AVX2 / SSE2

// The two passes of Q <- (I - Y S Y^T) Q over rows i0 .. n - 1 of the W column blocks from c (one vector register
// wide each), on the rows [i_begin, i_end) of a pass: reflector_sums adds their part of Y^T Q to acc (summed in
// registers over the rows), reflector_weights turns the sums into S Y^T Q, reflector_update subtracts Y (S Y^T Q)
// from the rows. Whole passes (apply_block_reflector), or a few rows at a time between the QL lockstep's rounds
// (FormQt::step): each element goes through the same operations in the same order either way.
template <int W, typename T, typename Vec>
THREEG_INLINE void reflector_sums(Vec (&acc)[kReflectors][W], const T* q, const T* yt, int64_t i_begin,
                                  int64_t i_end, int64_t ld, int64_t c) {
  constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  for (int64_t i = i_begin; i < i_end; ++i) {
    Vec qv[W];
    for (int w = 0; w < W; ++w) __builtin_memcpy(&qv[w], q + i * ld + c + w * kVector, sizeof(Vec));
#pragma GCC unroll 8
    for (int j = 0; j < kReflectors; ++j) {
      const T y = yt[j * ld + i];
      for (int w = 0; w < W; ++w) acc[j][w] += y * qv[w];
    }
  }
}

template <int W, typename T, typename Vec>
THREEG_INLINE void reflector_weights(const Vec (&acc)[kReflectors][W], const T (&s)[kReflectors][kReflectors],
                                     Vec (&wv)[kReflectors][W]) {
#pragma GCC unroll 8
  for (int j = 0; j < kReflectors; ++j) {
    for (int w = 0; w < W; ++w) wv[j][w] = s[j][j] * acc[j][w];
#pragma GCC unroll 8
    for (int l = j + 1; l < kReflectors; ++l)
      for (int w = 0; w < W; ++w) wv[j][w] += s[j][l] * acc[l][w];
  }
}

template <int W, typename T, typename Vec>
THREEG_INLINE void reflector_update(const Vec (&wv)[kReflectors][W], T* q, const T* yt, int64_t i_begin,
                                    int64_t i_end, int64_t ld, int64_t c) {
  constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  for (int64_t i = i_begin; i < i_end; ++i) {
    Vec qv[W];
    for (int w = 0; w < W; ++w) __builtin_memcpy(&qv[w], q + i * ld + c + w * kVector, sizeof(Vec));
#pragma GCC unroll 8
    for (int j = 0; j < kReflectors; ++j) {
      const T y = yt[j * ld + i];
      for (int w = 0; w < W; ++w) qv[w] -= y * wv[j][w];
    }
    for (int w = 0; w < W; ++w) __builtin_memcpy(q + i * ld + c + w * kVector, &qv[w], sizeof(Vec));
  }
}

// Q <- (I - Y S Y^T) Q on rows i0 .. n - 1 of the W column blocks from c, both passes whole.
template <int W, typename T>
THREEG_INLINE void apply_block_reflector(T* q, const T* yt, const T (&s)[kReflectors][kReflectors], int64_t i0,
                                         int64_t n, int64_t ld, int64_t c) {
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  Vec acc[kReflectors][W], wv[kReflectors][W];
#pragma GCC unroll 8
  for (int j = 0; j < kReflectors; ++j)
    for (int w = 0; w < W; ++w) acc[j][w] = Vec{};
  reflector_sums<W>(acc, q, yt, i0, n, ld, c);
  reflector_weights<W>(acc, s, wv);
  reflector_update<W>(wv, q, yt, i0, n, ld, c);
}

// form_qt of g matrices, one after the other: finish() runs it to the end; step() advances it by a few rows of one
// column block's pass (or one block of its set-up or of the transpose), small enough to go between two rounds of
// the QL lockstep (QLChain::run_lockstep's filler), whose chain of dependent operations leaves the core's units
// mostly idle: the rows' products run in that latency. Each matrix's Q^T comes out the same, bit for bit, either
// way. Per matrix, form_qt + the QL iteration of a group of eight (the C++ harness of docs/ext.md, "Eigensolver",
// float32, AVX-512, 2026-12-07): n = 64 14.5-15.3 -> 11.6-12.6 us, 128 60-64 -> 51-53, 196 165-174 -> 147-155.
template <typename T>
class FormQt {
  static constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));
  enum Phase { kStartMatrix, kStartBlock, kSum, kUpdate, kTranspose, kDone };

 public:
  // a[j], tau[j]: tridiagonalise's reflectors of matrix j; qt[j]: its Q^T (n x n in rows of stride ld); q: n x ld
  // scratch, yt: kReflectors x ld scratch.
  void start(int g, const T* const* a, const T* const* tau, T* const* qt, int64_t n, int64_t ld, T* q, T* yt) {
    g_ = g;
    a_ = a;
    tau_ = tau;
    qt_ = qt;
    n_ = n;
    ld_ = ld;
    q_ = q;
    yt_ = yt;
    j_ = 0;
    // Rows a step: the more at a larger n, where the products outnumber the rounds (n = 64 best at 4 in the harness
    // above, 128 and 196 at 8)
    rows_ = n >= 96 ? 8 : 4;
    phase_ = g > 0 ? kStartMatrix : kDone;
  }

  THREEG_INLINE void step() {
    if (phase_ == kSum) {
      sum_rows();
    } else if (phase_ == kUpdate) {
      update_rows();
    } else if (phase_ != kDone) {
      other_step();
    }
  }

  // The rest, a block's column blocks two at a time where AVX-512 has the registers (apply_block_reflector).
  void finish() {
    rows_ = n_;
    while (phase_ != kDone) {
      if (phase_ == kSum && i_ == i0_) {  // at the start of a column block: the block's rest in whole passes
        // With AVX-512's 32 vector registers, two column blocks at a time where two are left: each entry of Y^T is
        // loaded once for both. n = 128, float32, one thread: 37.6 -> 29.7 us (n = 64: 5.0 -> 4.6; 196: 97 -> 83).
        // Two blocks' sums need 16 registers, all AVX2 has.
        int64_t c = c_;
        if constexpr (THREEG_VECTOR_BYTES == 64) {
          for (; c + 2 * kVector <= ld_; c += 2 * kVector) apply_block_reflector<2>(q_, yt_, s_, i0_, n_, ld_, c);
        }
        for (; c < ld_; c += kVector) apply_block_reflector<1>(q_, yt_, s_, i0_, n_, ld_, c);
        next_block();
      } else {
        step();
      }
    }
  }

 private:
  THREEG_INLINE void sum_rows() {
    const int64_t end = std::min(i_ + rows_, n_);
    Vec acc[kReflectors][1];
    __builtin_memcpy(acc, acc_, sizeof(acc));
    reflector_sums<1>(acc, q_, yt_, i_, end, ld_, c_);
    i_ = end;
    if (i_ < n_) {
      __builtin_memcpy(acc_, acc, sizeof(acc));
      return;
    }
    reflector_weights<1>(acc, s_, acc_);
    i_ = i0_;
    phase_ = kUpdate;
  }

  THREEG_INLINE void update_rows() {
    const int64_t end = std::min(i_ + rows_, n_);
    reflector_update<1>(acc_, q_, yt_, i_, end, ld_, c_);
    i_ = end;
    if (i_ < n_) return;
    c_ += kVector;
    if (c_ < ld_) {
      start_sums();
    } else {
      next_block();
    }
  }

  void start_sums() {
    for (int j = 0; j < kReflectors; ++j) acc_[j][0] = Vec{};
    i_ = i0_;
    phase_ = kSum;
  }

  void next_block() {
    k0_ -= kReflectors;
    phase_ = k0_ >= 0 ? kStartBlock : kTranspose;
    block_ = 0;
  }

  // Q = I; a block's Y^T and S; one block of the transpose.
  __attribute__((noinline)) void other_step() {
    const int64_t n = n_, ld = ld_;
    if (phase_ == kStartMatrix) {
      std::fill(q_, q_ + n * ld, T(0));
      for (int64_t i = 0; i < n; ++i) q_[i * ld + i] = 1;
      k0_ = n >= 3 ? (n - 3) / kReflectors * kReflectors : -1;
      phase_ = k0_ >= 0 ? kStartBlock : kTranspose;
      block_ = 0;
    } else if (phase_ == kStartBlock) {
      if (!set_up_block()) {  // no reflector in it
        next_block();
        return;
      }
      c_ = i0_ / kLanes * kLanes;  // Y^T's rows are zero outside i0 .. n - 1: whole vectors from there to ld
      start_sums();
    } else {  // kTranspose: the block (i0.., j0..) of Q into (j0.., i0..) of Q^T, transposed in registers (ld is a
      // multiple of kLanes, so of the vector width; the padding is zero in both); element by element through a tile
      // in memory the transpose took ~12 of the ~57 us of form_qt at n = 128
      const int64_t blocks = (n + kVector - 1) / kVector;  // along a row of Q
      const int64_t i0 = block_ / blocks * kVector, j0 = block_ % blocks * kVector;
      T* qt = qt_[j_];
      Vec r[kVector];
      for (int64_t i = 0; i < kVector; ++i) {
        if (i0 + i < n) {
          __builtin_memcpy(&r[i], q_ + (i0 + i) * ld + j0, sizeof(Vec));
        } else {
          r[i] = Vec{};
        }
      }
      transpose_block<kVector / 2>(r);
      for (int64_t j = 0; j < kVector && j0 + j < n; ++j) __builtin_memcpy(qt + (j0 + j) * ld + i0, &r[j], sizeof(Vec));
      if (++block_ < ld / kVector * blocks) return;
      phase_ = ++j_ < g_ ? kStartMatrix : kDone;
    }
  }

  // Y^T's rows (u_k from k + 1 on; zero for a missing or trivial H_k) and S of the block from k0_; false if the
  // block has no reflector.
  bool set_up_block() {
    const int64_t n = n_, ld = ld_, k0 = k0_;
    const T* a = a_[j_];
    const T* tau = tau_[j_];
    for (int j = 0; j < kReflectors; ++j)
      for (int l = 0; l < kReflectors; ++l) s_[j][l] = 0;
    bool any = false;
    for (int j = 0; j < kReflectors; ++j) {
      const int64_t k = k0 + j;
      T* y = yt_ + j * ld;
      std::fill(y, y + ld, T(0));
      if (k > n - 3 || tau[k] == T(0)) continue;
      std::copy(a + k * ld + k + 1, a + k * ld + n, y + k + 1);
      s_[j][j] = tau[k];
      any = true;
    }
    if (!any) return false;
    i0_ = k0 + 1;
    const int64_t c0 = i0_ / kLanes * kLanes;
    for (int j = 1; j < kReflectors; ++j) {  // S[0:j, j] = -tau_j S[0:j, 0:j] (Y[:, 0:j]^T u_j)
      T z[kReflectors];
      for (int l = 0; l < j; ++l) z[l] = dot(yt_ + l * ld + c0, yt_ + j * ld + c0, ld - c0);
      for (int i = 0; i < j; ++i) {
        T sum = 0;
        for (int l = i; l < j; ++l) sum += s_[i][l] * z[l];
        s_[i][j] = -s_[j][j] * sum;
      }
    }
    return true;
  }

  int g_ = 0, j_ = 0;
  const T* const* a_ = nullptr;
  const T* const* tau_ = nullptr;
  T* const* qt_ = nullptr;
  int64_t n_ = 0, ld_ = 0, rows_ = 0;
  T* q_ = nullptr;
  T* yt_ = nullptr;
  Phase phase_ = kDone;
  int64_t k0_ = 0, i0_ = 0, c_ = 0, i_ = 0, block_ = 0;
  T s_[kReflectors][kReflectors] = {};
  Vec acc_[kReflectors][1];  // the sums Y^T Q of the pass in progress, then S Y^T Q
};

template <typename T>
THREEG_INLINE void form_qt(const T* a, const T* tau, int64_t n, int64_t ld, T* q, T* yt, T* qt) {
  FormQt<T> steps;
  steps.start(1, &a, &tau, &qt, n, ld, q, yt);
  steps.finish();
}

// The matrices whose QL iterations QLChain<T>::run_lockstep runs together, one a vector lane: 8, or as many as one
// vector register of the variant holds where that is fewer (AVX2 double: 4; SSE2: 4 float, 2 double): GCC keeps a
// vector wider than the hardware's registers in memory, and 8 lanes of double on AVX2 ran the own solver slower
// than syevd at n = 64 (0.98-0.99x, against 1.29x for the chains it replaced; 2026-12-07 00:41 UTC).
constexpr int kLanesQL = 8;
template <typename T>
constexpr int kLockstepLanes = THREEG_VECTOR_BYTES / static_cast<int>(sizeof(T)) < kLanesQL
                                   ? THREEG_VECTOR_BYTES / static_cast<int>(sizeof(T))
                                   : kLanesQL;

// The implicit QL iteration with Wilkinson shifts on T (d, e) of one matrix, one plane rotation (or one sweep's
// set-up) per step(), each rotation applied at once to rows i, i + 1 of the eigenvector rows vt (n rows of stride
// ld); or the iterations of a group of matrices in lockstep (run_lockstep), their rotations recorded as (c, s)
// with the sweeps' rows and applied by apply_rotations(). Once step() returns false (or run_lockstep returns), d
// holds the eigenvalues (unsorted) and the rows (after apply_rotations) the matching eigenvectors, unless failed().
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
    sweeps_.clear();
    // A coupling is negligible below eps |T| (EISPACK's tql2 tests against a running norm the same way). Relative
    // to its two diagonal neighbours instead, it never is among eigenvalues at the rounding level of |T|: the QL
    // iteration then ran out of sweeps on rank-deficient covariances (C x C with N <= C: 61 zero eigenvalues of 256,
    // or 25 of 64), every one of which went to syevd after 30 wasted sweeps. The eigenvalues are accurate to
    // eps |T| either way, as the tridiagonalisation leaves them.
    T norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      norm = std::max(norm, std::abs(d[i]) + std::abs(e[i]) + (i > 0 ? std::abs(e[i - 1]) : T(0)));
    }
    negligible_ = std::numeric_limits<T>::epsilon() * norm;
  }

  bool failed() const { return failed_; }

  // False once every eigenvalue has converged, or when one has not after 30 sweeps (EISPACK's limit; failed()).
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
        i_ = -1;
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
      rotate(vt_ + i * ld_, vt_ + (i + 1) * ld_, c_, s_, ld_);
      if (--i_ < l_) {
        d[l_] -= p_;
        e[l_] = g_;
        e[m_] = 0;
        i_ = -1;
      }
      return true;
    }
    int64_t m = l_;
    for (; m + 1 < n_; ++m) {  // the first negligible coupling at or below l splits T there
      if (std::abs(e[m]) <= negligible_) break;
    }
    if (m == l_) {  // d[l] has converged
      sweep_ = 0;
      return ++l_ < n_;
    }
    if (sweep_++ >= 30) {
      failed_ = true;
      return false;
    }
    g_ = shifted(d[l_], d[l_ + 1], e[l_], d[m]);
    s_ = 1;
    c_ = 1;
    p_ = 0;
    m_ = m;
    i_ = m - 1;
    return true;
  }

  // The chains ch[j] (j < g, started, live[j]) run to their ends together, chain j in vector lane j, all at the same
  // row: each round takes one row i for every chain whose current sweep covers it (l_j <= i < m_j), the
  // rotation's arithmetic (step(): a square root, a division and the products) one vector instruction for all the
  // lanes, on d and e held interleaved (lane j of row i at i L + j) so that a round loads and stores whole vectors;
  // the rounds of a pass run from the highest m_j - 1 down to the lowest l_j, and between passes every chain sets
  // up its next sweep (step()'s set-up: the splitting coupling of all the lanes found by one vector scan, then
  // each chain's shift). A chain that waits for the others loses its rounds (~5% at n = 64), against a rotation's
  // latency (~50 cycles) shared by L chains. Each round's (c, s) are recorded as two vectors in `rec`, where
  // apply_rotations() reads them (set_records). Every chain's rotations, sweeps and values are step()'s, bit for
  // bit: the same operations on the same operands in the same order (tests/test_ext.py checks the results of
  // a group against each matrix alone). `work`: 2 L n values.
  template <int L, typename Filler>
  static THREEG_INLINE void run_lockstep(QLChain* ch, int g, const bool* live_in, T* work, Buffer<T>& rec,
                                         Filler& filler) {
    typedef T Lanes __attribute__((vector_size(L * sizeof(T))));
    typedef decltype(Lanes{} < Lanes{}) Mask;
    // The size from a live chain: a chain whose matrix was not finite was never started (chain 0 included, whose n_
    // is then 0 in a new solver, or a previous call's): with ch[0].n_ that stopped every lane before its first sweep
    // and returned T's diagonal and the unrotated Q^T as converged.
    int64_t n = 0;
    for (int j = 0; j < g; ++j) {
      if (live_in[j]) {
        n = ch[j].n_;
        break;
      }
    }
    T *dl = work, *el = dl + L * n;
    int64_t stop[L], first[L];
    int sweeps[L];
    Lanes S = {}, C = {}, G = {}, P = {}, LO = {}, HI = {}, NEG = {};
    Mask live = {};
    rec.clear();
    // Room for n^2 + 8 n rounds, which a group's iterations stayed below (1.05 n^2 at n = 32, 0.98 at 64, 0.86 at 128,
    // 0.83 at 196, 0.50 at 256: eight covariances of relu-like features, N = 196): more grow the records by
    // reallocation, each a copy (grown from empty at every call, the records and their zero-filling took the forward
    // at C = 64 and 128, N = 196 3-5% longer).
    rec.reserve(2 * L * (n * n + 8 * n));
    for (int j = 0; j < L; ++j) {
      const bool on = j < g && live_in[j];
      for (int64_t i = 0; i < n; ++i) {
        dl[i * L + j] = on ? ch[j].d_[i] : T(0);
        el[i * L + j] = on ? ch[j].e_[i] : T(0);
      }
      NEG[j] = on ? ch[j].negligible_ : T(0);
      live[j] = on ? -1 : 0;
      sweeps[j] = 0;
    }
    const Lanes last = Lanes{} + static_cast<T>(n - 1);
    Lanes Lv = {};  // l_j: the rows above it have converged
    for (;;) {
      // Each live chain's next sweep, as step() sets it up: d[l_j] has converged while the coupling at l_j is
      // negligible (then l_j moves on by one and looks again); the sweep then runs from m_j, the first row below
      // whose coupling is negligible (n - 1 if none), up to l_j. For all the lanes in one scan of the rows, in
      // which no comparison waits on the previous row's (a lane's run of converged rows is a mask, and-ed).
      int64_t from = n;
      for (int j = 0; j < L; ++j) {
        if (live[j]) from = std::min(from, static_cast<int64_t>(Lv[j]));
      }
      if (from >= n) break;
      const Lanes L0 = Lv;
      Mask run = live, todo = live, moved = {};
      Lanes Mv = last;
      for (int64_t i = from; i + 1 < n; ++i) {
        Lanes E;
        __builtin_memcpy(&E, el + i * L, sizeof(Lanes));
        const Lanes I = Lanes{} + static_cast<T>(i);
        const Mask at = I >= L0;
        const Mask negligible = (E < T(0) ? -E : E) <= NEG;
        const Mask converged = at & run & negligible;
        Lv = converged ? I + T(1) : Lv;
        moved |= converged;
        const Mask found = at & ~run & negligible & todo;
        Mv = found ? I : Mv;
        todo &= ~found;
        run &= ~at | negligible;  // a coupling that is not negligible ends the run
      }
      live &= ~(todo & (Lv == last));  // l_j = n - 1: the last eigenvalue has converged too
      int64_t top = -1, bottom = n;
      for (int j = 0; j < L; ++j) {
        if (moved[j]) sweeps[j] = 0;
        if (!live[j]) continue;
        if (sweeps[j]++ >= 30) {
          live[j] = 0;
          ch[j].failed_ = true;
          continue;
        }
        const T* d = dl + j;
        const int64_t lj = static_cast<int64_t>(Lv[j]), mj = static_cast<int64_t>(Mv[j]);
        G[j] = shifted(d[lj * L], d[(lj + 1) * L], el[lj * L + j], d[mj * L]);
        stop[j] = lj;  // the sweep's last row, unless T splits within it
        top = std::max(top, mj - 1);
        bottom = std::min(bottom, lj);
      }
      S = live ? T(1) : S;
      C = live ? T(1) : C;
      P = live ? T(0) : P;
      LO = Lv;
      HI = live ? Mv - T(1) : T(-1);
      if (top < 0) break;
      // rec: the pass's rounds from row top down, (c, s) as two vectors a round
      const int64_t base = static_cast<int64_t>(rec.size()) / (2 * L);
      rec.resize(rec.size() + 2 * L * (top - bottom + 1));
      T* out = rec.data() + 2 * L * base;
      for (int j = 0; j < L; ++j) first[j] = base + top - (static_cast<int64_t>(Mv[j]) - 1);
      for (int64_t i = top; i >= bottom; --i, out += 2 * L) {
        filler.step();  // independent work for the units the round's chain leaves idle (FormQt)
        const Lanes I = Lanes{} + static_cast<T>(i);
        Mask act = (I >= LO) & (I <= HI);
        Lanes E, D0, D1, E1;
        __builtin_memcpy(&E, el + i * L, sizeof(Lanes));
        __builtin_memcpy(&D0, dl + i * L, sizeof(Lanes));
        __builtin_memcpy(&D1, dl + (i + 1) * L, sizeof(Lanes));
        __builtin_memcpy(&E1, el + (i + 1) * L, sizeof(Lanes));
        // step(), the rotation at i (2 c b as c (2 b): the same product, doubling is exact)
        const Lanes F = S * E, B = C * E, B2 = T(2) * B;
        Lanes R = F * F + G * G;
        lane_sqrt(R);
        E1 = act ? R : E1;
        const Mask split = act & (R == T(0));  // step(): T splits at i + 1, the sweep ends there
        Lanes Dn = split ? D1 - P : D1;
        act &= ~split;
        const Lanes Rinv = T(1) / R;
        const Lanes Sn = F * Rinv, Cn = G * Rinv;
        const Lanes Gt = D1 - P;
        const Lanes R2 = (D0 - Gt) * Sn + Cn * B2;
        const Lanes Pn = Sn * R2;
        Dn = act ? Gt + Pn : Dn;
        S = act ? Sn : S;
        C = act ? Cn : C;
        P = act ? Pn : P;
        G = act ? Cn * R2 - B : G;
        __builtin_memcpy(el + (i + 1) * L, &E1, sizeof(Lanes));
        __builtin_memcpy(dl + (i + 1) * L, &Dn, sizeof(Lanes));
        __builtin_memcpy(out, &C, sizeof(Lanes));
        __builtin_memcpy(out + L, &S, sizeof(Lanes));
        if (__builtin_expect(any_lane(split), 0)) {
          for (int j = 0; j < L; ++j) {
            if (split[j]) {  // lane j's sweep ends at row i + 1: no more rounds for it in this pass
              stop[j] = i + 1;
              HI[j] = T(-1);
            }
          }
        }
      }
      // each sweep's end, as step() has it, and its record: (m, first round, rotations)
      for (int j = 0; j < L; ++j) {
        if (!live[j]) continue;
        const int64_t mj = static_cast<int64_t>(Mv[j]), lj = static_cast<int64_t>(Lv[j]);
        if (stop[j] == lj) {
          dl[lj * L + j] -= P[j];
          el[lj * L + j] = G[j];
        }
        el[mj * L + j] = 0;
        std::vector<int64_t>& sw = ch[j].sweeps_;
        sw.push_back(mj);
        sw.push_back(first[j]);
        sw.push_back(mj - stop[j]);
      }
    }
    for (int j = 0; j < g; ++j) {
      if (!live_in[j]) continue;
      for (int64_t i = 0; i < n; ++i) ch[j].d_[i] = dl[i * L + j];
    }
  }

  // Where apply_rotations() finds the rotations run_lockstep recorded: lane j of `rec`, c of round r at
  // rec[2 L r + j], s at rec[(2 r + 1) L + j], read in place.
  static void set_records(QLChain* ch, int g, const T* rec) {
    for (int j = 0; j < g; ++j) ch[j].rot_ = rec + j;
  }

  // The recorded rotations (run_lockstep, set_records), applied to vt in column blocks of W vectors: for each
  // sweep, row m is carried in registers from rotation to rotation (rotation i makes row i + 1 final and leaves the
  // new row i to carry), two sweeps at a time (apply_block). Each carried vector waits on its previous rotation (a
  // product and a fused multiply-add, ~8 cycles), so both FMA units need 4 carried vectors at once: two sweeps of 2
  // vectors do. With AVX-512's 32 registers, blocks of 8 vectors read the rotations less often (n = 128, one matrix
  // of four: 69 us against 78 with blocks of 4 and 90 with 2); with the 16 of AVX2 / SSE2, two sweeps of 4 vectors
  // spill (367 us against 161 with blocks of 2).
  THREEG_INLINE void apply_rotations() {
    int64_t k0 = 0;
    if constexpr (kWideBlock == 8) {
      for (; k0 + 8 * kVector <= ld_; k0 += 8 * kVector) apply_block<8>(k0);
      if (k0 + 4 * kVector <= ld_) {
        apply_block<4>(k0);
        k0 += 4 * kVector;
      }
    }
    for (; k0 + 2 * kVector <= ld_; k0 += 2 * kVector) apply_block<2>(k0);
    for (; k0 < ld_; k0 += kVector) apply_block<1>(k0);
  }

 private:
  // A sweep's start, g = d[m] - shift, the shift being the eigenvalue of T's leading 2 x 2 block at l (dl, dl1, el)
  // nearer dl: one function for step() and run_lockstep, so that both start every sweep from the same bits.
  static THREEG_INLINE T shifted(T dl, T dl1, T el, T dm) {
    const T g = (dl1 - dl) / (T(2) * el);
    const T r = std::sqrt(g * g + T(1));
    return dm - dl + el / (g + std::copysign(r, g));
  }

  // One vector register of the variant's instruction set (64 bytes for AVX-512, 32 for AVX2, 16 for SSE2), and the
  // widest column block apply_rotations uses (above).
  static constexpr int64_t kVector = THREEG_VECTOR_BYTES / sizeof(T);
  static constexpr int kWideBlock = THREEG_VECTOR_BYTES == 64 ? 8 : 2;
  static constexpr int kLockLanes = kLockstepLanes<T>;  // run_lockstep's lanes
  static constexpr int64_t kRecStride = 2 * kLockLanes;  // its records: per round, c then s of every lane
  typedef T Vec __attribute__((vector_size(THREEG_VECTOR_BYTES)));

  template <int W>
  static THREEG_INLINE void load(Vec* v, const T* row) {
    for (int w = 0; w < W; ++w) __builtin_memcpy(&v[w], row + w * kVector, sizeof(Vec));
  }
  template <int W>
  static THREEG_INLINE void store(T* row, const Vec* v) {
    for (int w = 0; w < W; ++w) __builtin_memcpy(row + w * kVector, &v[w], sizeof(Vec));
  }

  // The rotation (c, s) on rows x (loaded) and y (carried): returns row i + 1's new value in out, y the new row i.
  template <int W>
  static THREEG_INLINE void rotate_carried(const Vec* x, Vec* y, T c, T s, Vec* out) {
    for (int w = 0; w < W; ++w) {
      out[w] = s * x[w] + c * y[w];
      y[w] = c * x[w] - s * y[w];
    }
  }

  // Consecutive sweeps are applied two at a time where the second one's rows end at or above the first's (the
  // usual case): the second follows one row behind the first, taking each row as the first leaves it final, so a
  // row is loaded and stored once for both (at n = 128 the rows of a column block overflow the L1 cache, and one
  // sweep at a time reloads them from L2 for every sweep). Every element goes through the same operations in the
  // same order as one sweep after the other.
  template <int W>
  THREEG_INLINE void apply_block(int64_t k0) {
    const size_t sweeps = sweeps_.size() / 3;
    const int64_t* sw = sweeps_.data();
    for (size_t q = 0; q < sweeps;) {
      const int64_t ma = sw[3 * q], na = sw[3 * q + 2];
      const T* ra = rot_ + kRecStride * sw[3 * q + 1];  // kRecStride: per round, c then s of every lane
      if (q + 1 < sweeps && sw[3 * q + 3] <= ma && na > 0 && sw[3 * q + 5] > 0) {
        apply_pair<W>(k0, ma, na, ra, sw[3 * q + 3], sw[3 * q + 5], rot_ + kRecStride * sw[3 * q + 4]);
        q += 2;
      } else {
        apply_sweep<W>(k0, ma, na, ra);
        q += 1;
      }
    }
  }

  // One sweep: rotations at i = m - 1 .. m - count, coefficients rot[t kRecStride] (c) and the s kLockLanes after
  // it for i = m - 1 - t.
  template <int W>
  THREEG_INLINE void apply_sweep(int64_t k0, int64_t m, int64_t count, const T* rot) {
    T* row = vt_ + m * ld_ + k0;
    Vec y[W], x[W], out[W];
    load<W>(y, row);
    for (int64_t t = 0; t < count; ++t) {
      load<W>(x, row - ld_);
      rotate_carried<W>(x, y, rot[t * kRecStride], rot[t * kRecStride + kLockLanes], out);
      store<W>(row, out);
      row -= ld_;
    }
    store<W>(row, y);
  }

  // Sweep a (rows ma - na .. ma) and then sweep b (rows mb - nb .. mb, mb <= ma) in one pass from the bottom up.
  template <int W>
  THREEG_INLINE void apply_pair(int64_t k0, int64_t ma, int64_t na, const T* ra, int64_t mb, int64_t nb,
                                const T* rb) {
    const int64_t la = ma - na, lb = mb - nb;
    T* base = vt_ + k0;
    Vec ya[W], yb[W] = {}, x[W], out[W], outb[W];  // yb is set before use (zeroed for the compiler's sake)
    bool b_started = false, b_done = false;
    // Row r is final for sweep a (value v): b's rotation at r (rows r, r + 1) takes it, or it is stored.
    auto to_b = [&](int64_t r, const Vec* v) {
      if (b_done || r > mb) {
        store<W>(base + r * ld_, v);
      } else if (r == mb) {
        for (int w = 0; w < W; ++w) yb[w] = v[w];
        b_started = true;
      } else {
        const int64_t t = mb - 1 - r;
        rotate_carried<W>(v, yb, rb[t * kRecStride], rb[t * kRecStride + kLockLanes], outb);
        store<W>(base + (r + 1) * ld_, outb);
        if (r == lb) {
          store<W>(base + r * ld_, yb);
          b_done = true;
        }
      }
    };
    load<W>(ya, base + ma * ld_);
    for (int64_t t = 0; t < na; ++t) {
      const int64_t i = ma - 1 - t;
      load<W>(x, base + i * ld_);
      rotate_carried<W>(x, ya, ra[t * kRecStride], ra[t * kRecStride + kLockLanes], out);
      to_b(i + 1, out);
    }
    to_b(la, ya);
    if (b_done) return;
    int64_t i = la - 1;  // b's rotations below sweep a's rows, on rows loaded here
    if (!b_started) {
      load<W>(yb, base + mb * ld_);
      i = mb - 1;
    }
    for (; i >= lb; --i) {
      const int64_t t = mb - 1 - i;
      load<W>(x, base + i * ld_);
      rotate_carried<W>(x, yb, rb[t * kRecStride], rb[t * kRecStride + kLockLanes], outb);
      store<W>(base + (i + 1) * ld_, outb);
    }
    store<W>(base + lb * ld_, yb);
  }

  T *d_ = nullptr, *e_ = nullptr, *vt_ = nullptr;
  int64_t n_ = 0, ld_ = 0, l_ = 0, m_ = 0, i_ = -1;
  int sweep_ = 0;
  bool failed_ = false;
  T s_ = 1, c_ = 1, p_ = 0, g_ = 0, negligible_ = 0;
  std::vector<int64_t> sweeps_;  // per recorded sweep: m, its first rotation's index and its number of rotations
  const T* rot_ = nullptr;       // this chain's lane of run_lockstep's records (set_records)
};

}  // namespace small_eigh_detail

// The most matrices solved together (see the top of this file), one a vector lane in QLChain::run_lockstep: the
// forward's samples of one thread at B = 16 on two threads. A rotation costs the lockstep ~50 cycles for all the
// lanes; at n = 64 a group of 8 took 11.7-12.1 us a matrix for its QL iteration (set-up and records included)
// against 20.2-24.7 us with the group's chains advanced a rotation each in turn (4 or 8 of them), at n = 128
// 41 against 66-75 us (standalone, AVX-512 float32; docs/ext.md, "Eigensolver").
constexpr int kGroup = small_eigh_detail::kLanesQL;

// Scratch of one thread for up to kGroup matrices of size n: reused across samples, and across calls where the
// kernels keep one per thread (Eigh::thread_solver in kernels.h).
template <typename T>
class SmallEigh {
 public:
  explicit SmallEigh(int64_t n)
      : n_(n),
        ld_((n + small_eigh_detail::kLanes - 1) / small_eigh_detail::kLanes * small_eigh_detail::kLanes),
        a_(kGroup * n * ld_),
        q_(n * ld_),
        vt_(kGroup * n * ld_),
        lanes_(2 * kGroup * n),
        yt_(small_eigh_detail::kReflectors * ld_),
        vec_(kGroup * (3 * n + 3 * ld_)),
        order_(n),
        chains_(kGroup),
        recs_(kGroup / small_eigh_detail::kLockstepLanes<T>) {}

  int64_t size() const { return n_; }

  // For j < g <= kGroup: a[j] row-major n x n symmetric (both triangles; read only) into v[j] (n x n, rows =
  // eigenvectors) and l[j] (ascending); ok[j] says whether that matrix converged.
  THREEG_INLINE void operator()(int g, const T* const* a, T* const* v, T* const* l, bool* ok) {
    using namespace small_eigh_detail;
    const int64_t n = n_, ld = ld_;
    bool live[kGroup];
    const T* reflectors[kGroup];  // of the finite matrices, m of them
    const T* taus[kGroup];
    T* qts[kGroup];
    int m = 0;
    for (int j = 0; j < g; ++j) {
      T* aj = a_.data() + j * n * ld;  // kept until its Q^T is formed
      T *d = vec(j), *e = d + n, *tau = e + n, *p = tau + n, *u = p + ld, *w = u + ld;
      live[j] = ok[j] = copy_finite(a[j], aj);
      if (!ok[j]) continue;
      tridiagonalise(aj, n, ld, d, e, tau, p, u, w);
      chains_[j].start(d, e, vt(j), n, ld);
      reflectors[m] = aj;
      taus[m] = tau;
      qts[m++] = vt(j);
    }
    if (g == 1) {
      if (live[0]) {
        form_qt(reflectors[0], taus[0], n, ld, q_.data(), yt_.data(), qts[0]);
        while (chains_[0].step()) {}
      }
    } else {
      // in lockstep, as many at a time as the variant's vector register holds (kLockstepLanes), the group's Q^T
      // formed between the rounds (FormQt), the rest of it after them
      using Chain = small_eigh_detail::QLChain<T>;
      constexpr int kBatch = small_eigh_detail::kLockstepLanes<T>;
      FormQt<T> formed;
      formed.start(m, reflectors, taus, qts, n, ld, q_.data(), yt_.data());
      for (int j0 = 0; j0 < g; j0 += kBatch) {
        const int count = std::min(kBatch, g - j0);
        Buffer<T>& rec = recs_[j0 / kBatch];
        Chain::template run_lockstep<kBatch>(chains_.data() + j0, count, live + j0, lanes_.data(), rec, formed);
        Chain::set_records(chains_.data() + j0, count, rec.data());
      }
      formed.finish();
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

  // a into the padded rows of `to` (zeros past n); false if an entry is not finite. A row is copied and tested
  // whole (an integer OR of the entries' tests, which vectorises; a test with an early exit per entry compiled to
  // a scalar loop, ~5% of the eigendecomposition at n = 64).
  bool copy_finite(const T* a, T* to) const {
    const int64_t n = n_, ld = ld_;
    constexpr T kMax = std::numeric_limits<T>::max();
    for (int64_t i = 0; i < n; ++i) {
      const T* row = a + i * n;
      T* dst = to + i * ld;
      int bad = 0;
      for (int64_t j = 0; j < n; ++j) {
        bad |= !(std::fabs(row[j]) <= kMax);  // false for +-inf and NaN
        dst[j] = row[j];
      }
      if (bad) return false;
      std::fill(dst + n, to + (i + 1) * ld, T(0));
    }
    return true;
  }

  int64_t n_, ld_;
  // (every element written before it is read) a_: each matrix of the group, reduced in place, its reflectors kept
  // until FormQt has formed its Q^T between the QL iteration's rounds (one buffer for the group when each Q^T was
  // formed right after the reduction); vt_: each matrix's eigenvector rows until they are sorted out
  small_eigh_detail::Buffer<T> a_, q_, vt_, lanes_;
  small_eigh_detail::Buffer<T> yt_, vec_;
  std::vector<int64_t> order_;
  std::vector<small_eigh_detail::QLChain<T>> chains_;
  // run_lockstep's records of the rotations, one a batch of lanes (lanes_: its work)
  std::vector<small_eigh_detail::Buffer<T>> recs_;
};

}  // namespace THREEG_CPU_VARIANT
}  // namespace threeg
