// Single-pass CPU kernels for a chain of Householder layers (han_surgery.kernels).
//
// A chain is L layers applied one after the other to every vector a of length n,
//
//     p = U a            (k projections, U: the k unit Householder vectors as rows)
//     w = T^T p          (T: the k x k upper-triangular compact-WY factor)
//     z = a - U^T w + b
//     a <- |z| (if the layer has abs) or z,
//
// i.e. a <- f(H_k ... H_1 a + b). L = 1 is a HanLayer / HouseholderLinear, L = 2 a HanBlock.
//
// The input is viewed as (B, n, C), contiguous: the vectors run along the middle dimension.
// C = 1 is the usual case (rows of a (N, n) matrix); C > 1 reflects along a non-last dimension
// without a transpose (the token mixing of a Han-Mixer, x of shape (batch, tokens, channels)).
//
// Forward reads x once and writes y once, a row (or a tile of C-columns) at a time, with every
// intermediate in cache. Backward reads x and dL/dy once and writes dL/dx once: it recomputes
// the chain's intermediates of the row (nothing but x is saved), then walks the layers back:
//
//     g <- g * sign(z)                    (abs layers)
//     G = U g,  G' = T G
//     dL/dU += -(G' a^T + w g^T)          dL/dT += -p G^T          dL/db += g
//     g <- g - U^T G'                     (dL/da, the input gradient of the layer)
//
// Parameter gradients are summed per thread (rows in blocks of kFlushRows, each block summed
// on its own and then added, so float32 sums of many rows stay accurate) and reduced in a fixed
// order, so results are reproducible for a given number of threads.
//
// Low-precision inputs (float16, bfloat16) are computed in float32 (at::opmath_type): the
// projections U a never overflow the input dtype. U, T and b come in that accumulation dtype.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <vector>

namespace han_surgery {
namespace {

constexpr int64_t kFlushRows = 64;        // rows summed per block of the parameter gradients
constexpr int64_t kWorkPerTask = 1 << 15;  // about this many multiply-adds per parallel task
constexpr int64_t kTileElems = 1 << 16;    // scratch elements per column tile (C > 1)

// Per-thread scratch memory, kept from one call to the next: buffers allocated and freed inside
// every call made glibc hand pages back and forth (page faults on every call).
inline char* thread_scratch(size_t bytes) {
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<char, Free> buffer;
  thread_local size_t capacity = 0;
  if (bytes > capacity) {
    capacity = std::max(bytes, 2 * capacity);
    buffer.reset(static_cast<char*>(std::aligned_alloc(64, capacity)));
    TORCH_CHECK(buffer != nullptr, "householder_chain: out of memory for ", capacity, " bytes of scratch");
  }
  return buffer.get();
}

// `counts.size()` zeroed arrays of acc_t from this thread's scratch, each 64-byte aligned.
template <typename acc_t, size_t N>
std::array<acc_t*, N> scratch_arrays(const std::array<int64_t, N>& counts) {
  const auto padded = [](int64_t count) { return (static_cast<size_t>(count) * sizeof(acc_t) + 63) / 64 * 64; };
  size_t total = 0;
  for (int64_t count : counts) total += padded(count);
  char* base = thread_scratch(total);
  std::fill(base, base + total, 0);
  std::array<acc_t*, N> out;
  size_t offset = 0;
  for (size_t i = 0; i < N; ++i) {
    out[i] = reinterpret_cast<acc_t*>(base + offset);
    offset += padded(counts[i]);
  }
  return out;
}

template <typename acc_t>
struct Chain {
  int64_t L, k, n;
  const acc_t* u;  // (L, k, n)
  const acc_t* t;  // (L, k, k)
  const acc_t* b;  // (L, n)
  std::vector<char> abs;
  const acc_t* ul(int64_t l) const { return u + l * k * n; }
  const acc_t* tl(int64_t l) const { return t + l * k * k; }
  const acc_t* bl(int64_t l) const { return b + l * n; }
};

template <typename acc_t>
inline acc_t sign_of(acc_t z) {
  return static_cast<acc_t>((z > acc_t(0)) - (z < acc_t(0)));
}

// a . b with four independent vector accumulators (one is latency-bound on the adds).
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  constexpr int64_t V = 64 / sizeof(acc_t);  // one 512-bit vector
  acc_t s0[V] = {}, s1[V] = {}, s2[V] = {}, s3[V] = {};
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      s0[v] += a[i + v] * b[i + v];
      s1[v] += a[i + V + v] * b[i + V + v];
      s2[v] += a[i + 2 * V + v] * b[i + 2 * V + v];
      s3[v] += a[i + 3 * V + v] * b[i + 3 * V + v];
    }
  }
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += (s0[v] + s1[v]) + (s2[v] + s3[v]);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename src_t, typename dst_t>
inline void convert(const src_t* __restrict src, dst_t* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Rows (C == 1)
// ---------------------------------------------------------------------------------------------

// p = U a, w = T^T p for layer l.
template <typename acc_t>
inline void project(const Chain<acc_t>& c, int64_t l, const acc_t* a, acc_t* p, acc_t* w) {
  const int64_t k = c.k, n = c.n;
  const acc_t* u = c.ul(l);
  const acc_t* t = c.tl(l);
  for (int64_t j = 0; j < k; ++j) p[j] = dot(a, u + j * n, n);
  for (int64_t j = 0; j < k; ++j) {
    acc_t s = 0;
    for (int64_t m = 0; m <= j; ++m) s += p[m] * t[m * k + j];  // T is upper triangular
    w[j] = s;
  }
}

// z = a - U^T w + b, out = |z| or z. `out` may be `a` (in place): every element depends on its
// own position only. z is also stored when `z` is given (k > 1 needs a buffer for it anyway; a
// second store stream costs as much as the arithmetic, so the forward passes nullptr for k = 1).
template <typename acc_t, typename out_t>
inline void apply_layer(const Chain<acc_t>& c, int64_t l, const acc_t* a, const acc_t* w, out_t* out, acc_t* z) {
  const int64_t k = c.k, n = c.n;
  const acc_t* __restrict u = c.ul(l);
  const acc_t* __restrict b = c.bl(l);
  const bool take_abs = c.abs[l];
  if (k == 1 && z == nullptr) {
    const acc_t w0 = w[0];
    if (take_abs) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(std::abs(a[i] - w0 * u[i] + b[i]));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(a[i] - w0 * u[i] + b[i]);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) z[i] = a[i] + b[i];
  for (int64_t j = 0; j < k; ++j) {
    const acc_t wj = w[j];
    const acc_t* __restrict uj = u + j * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] -= wj * uj[i];
  }
  if (take_abs) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(std::abs(z[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(z[i]);
  }
}

template <typename scalar_t, typename acc_t>
void rows_forward(const scalar_t* x, scalar_t* y, int64_t rows, const Chain<acc_t>& c) {
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / (n * k * L));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    auto [buf, in, z, p, w] = scratch_arrays<acc_t, 5>({n, n, n, k, k});
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * n;
      scalar_t* yr = y + r * n;
      const acc_t* a;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        a = xr;
      } else {
        convert(xr, in, n);
        a = in;
      }
      for (int64_t l = 0; l < L; ++l) {
        project(c, l, a, p, w);
        acc_t* zbuf = k == 1 ? nullptr : z;
        if (l == L - 1) {
          apply_layer(c, l, a, w, yr, zbuf);
        } else {
          apply_layer(c, l, a, w, buf, zbuf);
          a = buf;
        }
      }
    }
  });
}

// Per-thread sums of the parameter gradients: flushed from a block of rows into a total.
template <typename acc_t>
struct GradSums {
  std::vector<acc_t> du, dt, db;       // totals of this task
  std::vector<acc_t> bdu, bdt, bdb;    // the current block of rows
  int64_t rows_in_block = 0;
  GradSums(int64_t L, int64_t k, int64_t n)
      : du(L * k * n), dt(L * k * k), db(L * n), bdu(L * k * n), bdt(L * k * k), bdb(L * n) {}
  void rows_done(int64_t count) {
    rows_in_block += count;
    if (rows_in_block >= kFlushRows) flush();
  }
  void flush() {
    add_and_clear(bdu, du);
    add_and_clear(bdt, dt);
    add_and_clear(bdb, db);
    rows_in_block = 0;
  }
  static void add_and_clear(std::vector<acc_t>& from, std::vector<acc_t>& to) {
    const int64_t m = static_cast<int64_t>(from.size());
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      to[i] += from[i];
      from[i] = 0;
    }
  }
};

// Reduce the per-task sums (in task order) into the output gradients.
template <typename acc_t>
void reduce_sums(std::vector<GradSums<acc_t>*>& sums, acc_t* du, acc_t* dt, acc_t* db) {
  for (GradSums<acc_t>* s : sums) {
    if (s == nullptr) continue;
    for (size_t i = 0; i < s->du.size(); ++i) du[i] += s->du[i];
    for (size_t i = 0; i < s->dt.size(); ++i) dt[i] += s->dt[i];
    for (size_t i = 0; i < s->db.size(); ++i) db[i] += s->db[i];
    delete s;
  }
}

// Hands this task's sums to the thread's slot (a thread may run more than one task).
template <typename acc_t>
void store_sums(std::vector<GradSums<acc_t>*>& sums, GradSums<acc_t>* s) {
  if (s == nullptr) return;
  s->flush();
  GradSums<acc_t>*& slot = sums[at::get_thread_num()];
  if (slot == nullptr) {
    slot = s;
    return;
  }
  GradSums<acc_t>::add_and_clear(s->du, slot->du);
  GradSums<acc_t>::add_and_clear(s->dt, slot->dt);
  GradSums<acc_t>::add_and_clear(s->db, slot->db);
  delete s;
}

// Parameter-gradient sums of layer l over a block of nr rows, accumulated in registers over the
// rows (one load and one store of each sum per block):
//     du_j -= sum_r (G'_rj a_r + w_rj g_r),   db += sum_r g_r,   dT -= sum_r p_r G_r^T.
template <typename acc_t>
inline void accumulate_params(const Chain<acc_t>& c, int64_t l, int64_t nr, const acc_t* const* a_rows,
                              const acc_t* g_rows, const acc_t* p, const acc_t* w, const acc_t* G, const acc_t* Gt,
                              GradSums<acc_t>* s) {
  constexpr int64_t V = 64 / sizeof(acc_t);
  const int64_t k = c.k, n = c.n;
  acc_t* db = s->bdb.data() + l * n;
  for (int64_t j = 0; j < k; ++j) {
    acc_t* du = s->bdu.data() + (l * k + j) * n;
    const bool with_db = j == 0;
    int64_t i = 0;
    for (; i + V <= n; i += V) {
      acc_t dacc[V], bacc[V];
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        dacc[v] = du[i + v];
        bacc[v] = db[i + v];
      }
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t gt = Gt[r * k + j], wr = w[r * k + j];
        const acc_t* __restrict ar = a_rows[r] + i;
        const acc_t* __restrict gr = g_rows + r * n + i;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
          dacc[v] -= gt * ar[v] + wr * gr[v];
          bacc[v] += gr[v];
        }
      }
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) du[i + v] = dacc[v];
      if (with_db) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) db[i + v] = bacc[v];
      }
    }
    for (; i < n; ++i) {
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t gri = g_rows[r * n + i];
        du[i] -= Gt[r * k + j] * a_rows[r][i] + w[r * k + j] * gri;
        if (with_db) db[i] += gri;
      }
    }
  }
  acc_t* dt = s->bdt.data() + l * k * k;
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t m = 0; m < k; ++m)
      for (int64_t j = 0; j < k; ++j) dt[m * k + j] -= p[r * k + m] * G[r * k + j];
}

// Backward over blocks of R rows. Per block: recompute the chain's inputs of layers 1..L-1 (and,
// for k > 1, every z), then per layer from the last: g <- g * sign(z), G = U g, G' = T G; the
// parameter sums; g <- g - U^T G' (written straight into dL/dx for layer 0). For k = 1, sign(z)
// is recomputed on the fly (one fused pass that also computes G), which saves storing z.
template <typename scalar_t, typename acc_t>
void rows_backward(const scalar_t* gy, const scalar_t* x, scalar_t* dx, int64_t rows, const Chain<acc_t>& c,
                   bool need_params, acc_t* du, acc_t* dt, acc_t* db) {
  constexpr int64_t R = 8;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // read x and dL/dy rows in place
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t grain = std::max<int64_t>(R, kWorkPerTask / (3 * n * k * L));
  std::vector<GradSums<acc_t>*> sums(at::get_num_threads(), nullptr);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    auto [acts, zs, gbuf, tail, p, w, G, Gt] =
        scratch_arrays<acc_t, 8>({L * R * n, k > 1 ? L * R * n : 0, R * n, n, L * R * k, L * R * k, R * k, R * k});
    GradSums<acc_t>* s = need_params ? new GradSums<acc_t>(L, k, n) : nullptr;
    const acc_t* a_rows[R];
    for (int64_t b0 = r0; b0 < r1; b0 += R) {
      const int64_t nr = std::min(R, r1 - b0);
      // Forward recompute: acts[l][r] is the input of layer l >= 1 (layer 0 reads x).
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* cur;
        if constexpr (kDirect) {
          cur = x + (b0 + r) * n;
        } else {
          convert(x + (b0 + r) * n, acts + r * n, n);
          cur = acts + r * n;
        }
        for (int64_t l = 0; l < L; ++l) {
          acc_t* pl = p + (l * R + r) * k;
          acc_t* wl = w + (l * R + r) * k;
          project(c, l, cur, pl, wl);
          acc_t* next = l + 1 < L ? acts + ((l + 1) * R + r) * n : nullptr;
          if (k > 1) {
            apply_layer(c, l, cur, wl, next != nullptr ? next : tail, zs + (l * R + r) * n);
          } else if (next != nullptr) {
            apply_layer(c, l, cur, wl, next, static_cast<acc_t*>(nullptr));
          }
          cur = next;
        }
      }
      for (int64_t l = L - 1; l >= 0; --l) {
        const acc_t* __restrict u = c.ul(l);
        const acc_t* __restrict b = c.bl(l);
        const acc_t* t = c.tl(l);
        const bool take_abs = c.abs[l];
        for (int64_t r = 0; r < nr; ++r) {
          const acc_t* a;
          if (l > 0) {
            a = acts + (l * R + r) * n;
          } else if constexpr (kDirect) {
            a = x + (b0 + r) * n;
          } else {
            a = acts + r * n;
          }
          a_rows[r] = a;
          acc_t* __restrict g = gbuf + r * n;
          const acc_t* gsrc = g;  // dL/d(output of layer l)
          if (l == L - 1) {
            if constexpr (kDirect) {
              gsrc = gy + (b0 + r) * n;
            } else {
              convert(gy + (b0 + r) * n, g, n);
            }
          }
          acc_t* Gr = G + r * k;
          if (k == 1) {
            const acc_t w0 = w[(l * R + r) * k];
            acc_t G0 = 0;
            if (take_abs) {
#pragma omp simd reduction(+ : G0)
              for (int64_t i = 0; i < n; ++i) {
                const acc_t gi = gsrc[i] * sign_of(a[i] - w0 * u[i] + b[i]);
                g[i] = gi;
                G0 += gi * u[i];
              }
            } else {
#pragma omp simd reduction(+ : G0)
              for (int64_t i = 0; i < n; ++i) {
                const acc_t gi = gsrc[i];
                g[i] = gi;
                G0 += gi * u[i];
              }
            }
            Gr[0] = G0;
          } else {
            const acc_t* __restrict z = zs + (l * R + r) * n;
            if (take_abs) {
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) g[i] = gsrc[i] * sign_of(z[i]);
            } else if (gsrc != g) {
              std::copy(gsrc, gsrc + n, g);
            }
            for (int64_t j = 0; j < k; ++j) Gr[j] = dot(g, u + j * n, n);
          }
          for (int64_t j = 0; j < k; ++j) {  // G' = T G
            acc_t sum = 0;
            for (int64_t m = j; m < k; ++m) sum += t[j * k + m] * Gr[m];
            Gt[r * k + j] = sum;
          }
        }
        if (s != nullptr) accumulate_params(c, l, nr, a_rows, gbuf, p + l * R * k, w + l * R * k, G, Gt, s);
        if (l == 0 && dx == nullptr) break;
        for (int64_t r = 0; r < nr; ++r) {
          acc_t* __restrict g = gbuf + r * n;
          if (l == 0 && k == 1) {  // dL/dx = g - G' u, written once
            const acc_t gt = Gt[r];
            scalar_t* __restrict out = dx + (b0 + r) * n;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(g[i] - gt * u[i]);
            continue;
          }
          for (int64_t j = 0; j < k; ++j) {
            const acc_t gt = Gt[r * k + j];
            const acc_t* __restrict uj = u + j * n;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) g[i] -= gt * uj[i];
          }
          if (l == 0) convert(g, dx + (b0 + r) * n, n);
        }
      }
      if (s != nullptr) s->rows_done(nr);
    }
    store_sums(sums, s);
  });
  if (need_params) reduce_sums(sums, du, dt, db);
}

// ---------------------------------------------------------------------------------------------
// Column tiles (C > 1): the vectors are the columns of each (n, C) slab; a task is a tile of
// `cw` adjacent columns of one slab, processed with the columns as the vector dimension.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
inline void cols_project(const Chain<acc_t>& c, int64_t l, const acc_t* A, int64_t cw, acc_t* P, acc_t* W) {
  const int64_t k = c.k, n = c.n;
  const acc_t* u = c.ul(l);
  const acc_t* t = c.tl(l);
  std::fill(P, P + k * cw, acc_t(0));
  for (int64_t r = 0; r < n; ++r) {
    const acc_t* __restrict ar = A + r * cw;
    for (int64_t j = 0; j < k; ++j) {
      const acc_t ujr = u[j * n + r];
      acc_t* __restrict pj = P + j * cw;
#pragma omp simd
      for (int64_t q = 0; q < cw; ++q) pj[q] += ujr * ar[q];
    }
  }
  for (int64_t j = 0; j < k; ++j) {  // W = T^T P
    acc_t* __restrict wj = W + j * cw;
    std::fill(wj, wj + cw, acc_t(0));
    for (int64_t m = 0; m <= j; ++m) {
      const acc_t tmj = t[m * k + j];
      const acc_t* __restrict pm = P + m * cw;
#pragma omp simd
      for (int64_t q = 0; q < cw; ++q) wj[q] += tmj * pm[q];
    }
  }
}

// Z = A - U^T W + b 1^T; Out = |Z| or Z. Out may be A (in place); Z is kept in Z_out when given.
template <typename acc_t>
inline void cols_apply(const Chain<acc_t>& c, int64_t l, const acc_t* A, const acc_t* W, int64_t cw, acc_t* Out,
                       acc_t* Z_out) {
  const int64_t k = c.k, n = c.n;
  const acc_t* u = c.ul(l);
  const acc_t* b = c.bl(l);
  const bool take_abs = c.abs[l];
  for (int64_t r = 0; r < n; ++r) {
    const acc_t* ar = A + r * cw;
    acc_t* outr = Out + r * cw;
    acc_t* zr = Z_out != nullptr ? Z_out + r * cw : outr;
    const acc_t br = b[r];
#pragma omp simd
    for (int64_t q = 0; q < cw; ++q) zr[q] = ar[q] + br;
    for (int64_t j = 0; j < k; ++j) {
      const acc_t ujr = u[j * n + r];
      const acc_t* __restrict wj = W + j * cw;
#pragma omp simd
      for (int64_t q = 0; q < cw; ++q) zr[q] -= ujr * wj[q];
    }
    if (take_abs) {
#pragma omp simd
      for (int64_t q = 0; q < cw; ++q) outr[q] = std::abs(zr[q]);
    } else if (zr != outr) {
      std::copy(zr, zr + cw, outr);
    }
  }
}

template <typename src_t, typename dst_t>
inline void load_tile(const src_t* src, int64_t stride, dst_t* dst, int64_t n, int64_t cw) {
  for (int64_t r = 0; r < n; ++r) convert(src + r * stride, dst + r * cw, cw);
}

inline int64_t tile_width(int64_t n, int64_t L, int64_t C, int64_t copies) {
  int64_t cw = kTileElems / std::max<int64_t>(1, copies * L * n);
  cw = std::max<int64_t>(16, cw - cw % 16);
  return std::min(cw, C);
}

template <typename scalar_t, typename acc_t>
void cols_forward(const scalar_t* x, scalar_t* y, int64_t B, int64_t C, const Chain<acc_t>& c) {
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t cw_max = tile_width(n, 1, C, 1);
  const int64_t tiles = (C + cw_max - 1) / cw_max;
  at::parallel_for(0, B * tiles, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> A(n * cw_max), P(k * cw_max), W(k * cw_max);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bi = item / tiles, c0 = (item % tiles) * cw_max, cw = std::min(cw_max, C - c0);
      const int64_t off = bi * n * C + c0;
      load_tile(x + off, C, A.data(), n, cw);
      for (int64_t l = 0; l < L; ++l) {
        cols_project(c, l, A.data(), cw, P.data(), W.data());
        cols_apply(c, l, A.data(), W.data(), cw, A.data(), static_cast<acc_t*>(nullptr));
      }
      for (int64_t r = 0; r < n; ++r) convert(A.data() + r * cw, y + off + r * C, cw);
    }
  });
}

template <typename scalar_t, typename acc_t>
void cols_backward(const scalar_t* gy, const scalar_t* x, scalar_t* dx, int64_t B, int64_t C, const Chain<acc_t>& c,
                   bool need_params, acc_t* du, acc_t* dt, acc_t* db) {
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t cw_max = tile_width(n, L, C, 2);
  const int64_t tiles = (C + cw_max - 1) / cw_max;
  std::vector<GradSums<acc_t>*> sums(at::get_num_threads(), nullptr);
  at::parallel_for(0, B * tiles, 1, [&](int64_t i0, int64_t i1) {
    const int64_t tile = n * cw_max;
    std::vector<acc_t> acts(L * tile), zs(L * tile), g(tile), P(L * k * cw_max), W(L * k * cw_max), G(k * cw_max),
        Gt(k * cw_max);
    GradSums<acc_t>* s = need_params ? new GradSums<acc_t>(L, k, n) : nullptr;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bi = item / tiles, c0 = (item % tiles) * cw_max, cw = std::min(cw_max, C - c0);
      const int64_t off = bi * n * C + c0;
      load_tile(x + off, C, acts.data(), n, cw);
      for (int64_t l = 0; l < L; ++l) {
        acc_t* a = acts.data() + l * tile;
        acc_t* Pl = P.data() + l * k * cw_max;
        acc_t* Wl = W.data() + l * k * cw_max;
        cols_project(c, l, a, cw, Pl, Wl);
        acc_t* next = l + 1 < L ? acts.data() + (l + 1) * tile : g.data();  // the last output is not needed
        cols_apply(c, l, a, Wl, cw, next, zs.data() + l * tile);
      }
      load_tile(gy + off, C, g.data(), n, cw);
      for (int64_t l = L - 1; l >= 0; --l) {
        const acc_t* a = acts.data() + l * tile;
        const acc_t* z = zs.data() + l * tile;
        const acc_t* Pl = P.data() + l * k * cw_max;
        const acc_t* Wl = W.data() + l * k * cw_max;
        const acc_t* u = c.ul(l);
        const acc_t* t = c.tl(l);
        if (c.abs[l]) {
          for (int64_t i = 0; i < n * cw; ++i) g[i] *= sign_of(z[i]);
        }
        cols_project(c, l, g.data(), cw, G.data(), Gt.data());  // G = U g (Gt is scratch here)
        for (int64_t j = 0; j < k; ++j) {                          // G' = T G
          acc_t* __restrict gtj = Gt.data() + j * cw;
          std::fill(gtj, gtj + cw, acc_t(0));
          for (int64_t m = j; m < k; ++m) {
            const acc_t tjm = t[j * k + m];
            const acc_t* __restrict gm = G.data() + m * cw;
#pragma omp simd
            for (int64_t q = 0; q < cw; ++q) gtj[q] += tjm * gm[q];
          }
        }
        if (s != nullptr) {
          acc_t* du_l = s->bdu.data() + l * k * n;
          acc_t* db_l = s->bdb.data() + l * n;
          acc_t* dt_l = s->bdt.data() + l * k * k;
          for (int64_t r = 0; r < n; ++r) {
            const acc_t* ar = a + r * cw;
            const acc_t* gr = g.data() + r * cw;
            for (int64_t j = 0; j < k; ++j) {
              du_l[j * n + r] -= dot(Gt.data() + j * cw, ar, cw) + dot(Wl + j * cw, gr, cw);
            }
            acc_t sg = 0;
#pragma omp simd reduction(+ : sg)
            for (int64_t q = 0; q < cw; ++q) sg += gr[q];
            db_l[r] += sg;
          }
          for (int64_t m = 0; m < k; ++m)
            for (int64_t j = 0; j < k; ++j) dt_l[m * k + j] -= dot(Pl + m * cw, G.data() + j * cw, cw);
        }
        if (l > 0 || dx != nullptr) {
          for (int64_t r = 0; r < n; ++r) {
            acc_t* __restrict gr = g.data() + r * cw;
            for (int64_t j = 0; j < k; ++j) {
              const acc_t ujr = u[j * n + r];
              const acc_t* __restrict gtj = Gt.data() + j * cw;
#pragma omp simd
              for (int64_t q = 0; q < cw; ++q) gr[q] -= ujr * gtj[q];
            }
          }
        }
      }
      if (dx != nullptr) {
        for (int64_t r = 0; r < n; ++r) convert(g.data() + r * cw, dx + off + r * C, cw);
      }
      if (s != nullptr) s->rows_done(1);
    }
    store_sums(sums, s);
  });
  if (need_params) reduce_sums(sums, du, dt, db);
}

// ---------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------

void check_args(const at::Tensor& x, const at::Tensor& u, const at::Tensor& t, const at::Tensor& b,
                at::IntArrayRef abs) {
  TORCH_CHECK(x.device().is_cpu(), "han_surgery householder_chain (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "householder_chain: x must be a contiguous (B, n, C) tensor");
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(u.dim() == 3 && u.is_contiguous() && u.scalar_type() == acc,
              "householder_chain: u must be a contiguous (L, k, n) tensor in the accumulation dtype of x");
  const int64_t L = u.size(0), k = u.size(1), n = u.size(2);
  TORCH_CHECK(n == x.size(1), "householder_chain: x has ", x.size(1), " features but u has ", n);
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.scalar_type() == acc && t.size(0) == L && t.size(1) == k &&
                  t.size(2) == k,
              "householder_chain: t must be a contiguous (L, k, k) tensor like u");
  TORCH_CHECK(b.dim() == 2 && b.is_contiguous() && b.scalar_type() == acc && b.size(0) == L && b.size(1) == n,
              "householder_chain: b must be a contiguous (L, n) tensor like u");
  TORCH_CHECK(static_cast<int64_t>(abs.size()) == L, "householder_chain: one abs flag per layer");
  TORCH_CHECK(u.device().is_cpu() && t.device().is_cpu() && b.device().is_cpu(),
              "householder_chain: all tensors must be on the CPU");
}

template <typename acc_t>
Chain<acc_t> make_chain(const at::Tensor& u, const at::Tensor& t, const at::Tensor& b, at::IntArrayRef abs) {
  Chain<acc_t> c{u.size(0), u.size(1), u.size(2), u.const_data_ptr<acc_t>(), t.const_data_ptr<acc_t>(),
                 b.const_data_ptr<acc_t>(), std::vector<char>(abs.begin(), abs.end())};
  return c;
}

at::Tensor chain_forward(const at::Tensor& x, const at::Tensor& u, const at::Tensor& t, const at::Tensor& b,
                         at::IntArrayRef abs) {
  check_args(x, u, t, b, abs);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t B = x.size(0), C = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "householder_chain_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Chain<acc_t> c = make_chain<acc_t>(u, t, b, abs);
    if (C == 1) {
      rows_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, c);
    } else {
      cols_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, C, c);
    }
  });
  return y;
}

// Returns [dx, du, dt, db]; dx is empty unless need_input, the others unless need_params.
std::vector<at::Tensor> chain_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u,
                                       const at::Tensor& t, const at::Tensor& b, at::IntArrayRef abs,
                                       bool need_input, bool need_params) {
  check_args(x, u, t, b, abs);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(),
              "householder_chain: grad must be contiguous and match x");
  const int64_t B = x.size(0), C = x.size(2);
  at::Tensor dx = need_input ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const auto zeros_like_param = [&](const at::Tensor& p) {
    return need_params ? at::zeros(p.sizes(), p.options()) : at::empty({0}, p.options());
  };
  at::Tensor du = zeros_like_param(u), dt = zeros_like_param(t), db = zeros_like_param(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "householder_chain_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Chain<acc_t> c = make_chain<acc_t>(u, t, b, abs);
    scalar_t* dx_ptr = need_input ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* du_ptr = need_params ? du.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* dt_ptr = need_params ? dt.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* db_ptr = need_params ? db.mutable_data_ptr<acc_t>() : nullptr;
    if (C == 1) {
      rows_backward<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx_ptr, B, c,
                                     need_params, du_ptr, dt_ptr, db_ptr);
    } else {
      cols_backward<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx_ptr, B, C, c,
                                     need_params, du_ptr, dt_ptr, db_ptr);
    }
  });
  return {dx, du, dt, db};
}

}  // namespace
}  // namespace han_surgery

TORCH_LIBRARY(han_surgery, m) {
  m.def("householder_chain_forward(Tensor x, Tensor u, Tensor t, Tensor b, int[] abs) -> Tensor");
  m.def(
      "householder_chain_backward(Tensor grad, Tensor x, Tensor u, Tensor t, Tensor b, int[] abs, bool need_input, "
      "bool need_params) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(han_surgery, CPU, m) {
  m.impl("householder_chain_forward", &han_surgery::chain_forward);
  m.impl("householder_chain_backward", &han_surgery::chain_backward);
}
