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
// without a transpose (the token mixing of a Han-Mixer, x of shape (batch, tokens, channels)):
// then a task is a tile of adjacent columns of one (n, C) slab, and the same math runs with
// the tile's columns as the vector lanes.
//
// Forward reads x once and writes y once, with every intermediate in cache. Backward reads x
// and dL/dy once and writes dL/dx once: it recomputes the chain's intermediates (nothing but x
// is saved; one layer with k > 1 may keep U x and sign(z) instead, see "Saved projections and
// signs"), then walks the layers back:
//
//     g <- g * sign(z)                    (abs layers)
//     G = U g,  G' = T G
//     dL/dU += -(G' a^T + w g^T)          dL/dT += -p G^T          dL/db += g
//     g <- g - U^T G'                     (dL/da, the input gradient of the layer)
//
// Updates of the form out = base + sum_m c_m src_m sum many sources per pass in registers
// (`combine`, up to 8 at a time; a group's rows in `update_rows` and `backprop_rows`): on the
// machines measured, a loop that reads and writes the same row again and again (one axpy per
// source) is store-bound and 10x slower. With k > 1
// reflections per layer, rows go in groups that share each load of U, their accumulators in
// registers (see "Row groups"): without that, k = 16 cost 3x k = 1 instead of 1.7x (forward).
// From k = 16 on, the projections U a read U transposed, the k directions along the vector lanes
// (project_dots_transposed: no horizontal sums; k = 16 forward 1.28x faster).
// At k = 1, short rows (n <= 128) go in groups too, and so does the forward of deep chains
// (forward_in_row_groups). Rows whose length is not a multiple of the vector width end in one
// partial vector (masked loads and stores with AVX-512), not a scalar loop.
//
// Parameter gradients are summed per task, in blocks of kFlushRows rows (each block summed on
// its own, then added, so float32 sums of many rows stay accurate), and reduced in task order:
// results are reproducible for a given number of threads.
//
// Low-precision inputs (float16, bfloat16) are computed in float32 (at::opmath_type): the
// projections U a never overflow the input dtype. U, T and b come in that accumulation dtype.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace han_surgery {
namespace {

constexpr int64_t kFlushRows = 64;         // rows summed per block of the parameter gradients
constexpr int64_t kBlockRows = 8;          // rows per block of the row backward
// Register blocking of the row groups (k > 1, see "Row groups"): rows that share each load of U,
// directions per dot-product pass, vector chunks per row in flight in an update (accumulators:
// kSharedRows x kDirections and kSharedRows x kChunksInFlight 512-bit vectors).
#ifdef __AVX512F__
constexpr int64_t kSharedRows = 8;
constexpr int kDirections = 2;
constexpr int kChunksInFlight = 2;
#else
constexpr int64_t kSharedRows = 4;
constexpr int kDirections = 1;
constexpr int kChunksInFlight = 1;
#endif
static_assert(kBlockRows % kSharedRows == 0, "a backward block is whole groups of rows");
constexpr int64_t kTransposedMinDirections = 16;  // k from which projections read U transposed (k = 8: 0.92-0.94x)
constexpr int64_t kGroupedMaxFeatures = 128;  // k = 1 layers this narrow run in row groups too
constexpr int64_t kGroupedMinLayers = 3;      // and k = 1 chains this deep run their forward in row groups
constexpr int64_t kWorkPerTask = 1 << 15;  // about this many multiply-adds per parallel task
constexpr int64_t kTileElems = 1 << 16;    // scratch elements per column tile (C > 1)

// ---------------------------------------------------------------------------------------------
// Scratch memory
// ---------------------------------------------------------------------------------------------

// Per-thread scratch, kept from one call to the next (no allocation per call or task).
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

// N arrays of acc_t from this thread's scratch, each 64-byte aligned (not initialised).
template <typename acc_t, size_t N>
std::array<acc_t*, N> scratch_arrays(const std::array<int64_t, N>& counts) {
  const auto padded = [](int64_t count) { return (static_cast<size_t>(count) * sizeof(acc_t) + 63) / 64 * 64; };
  size_t total = 0;
  for (int64_t count : counts) total += padded(count);
  char* base = thread_scratch(total);
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
  const acc_t* tt = nullptr;  // (L, k, k): T transposed
  const acc_t* ut = nullptr;  // (L, n, kp): U transposed, k zero-padded to kp (whole vectors), or nullptr
  int64_t kp = 0;
  const acc_t* ul(int64_t l) const { return u + l * k * n; }
  const acc_t* tl(int64_t l) const { return t + l * k * k; }
  const acc_t* ttl(int64_t l) const { return tt + l * k * k; }
  const acc_t* bl(int64_t l) const { return b + l * n; }
  const acc_t* utl(int64_t l) const { return ut + l * n * kp; }
};

// ---------------------------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
inline acc_t sign_of(acc_t z) {
  return static_cast<acc_t>((z > acc_t(0)) - (z < acc_t(0)));
}

constexpr int64_t lanes(size_t bytes) { return static_cast<int64_t>(64 / bytes); }  // one 512-bit vector

// Sum of a vector's lanes as a tree (log depth; the compiler's reduction epilogue adds them in order).
template <typename acc_t, int64_t V>
inline acc_t tree_sum(acc_t (&a)[V]) {
#pragma GCC unroll 8
  for (int64_t width = V / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int64_t v = 0; v < width; ++v) a[v] += a[v + width];
  }
  return a[0];
}

// One 512-bit vector of acc_t as a GCC/Clang vector type: the compiler keeps a group's
// accumulators in registers (as two 256-bit halves without AVX-512), which arrays under
// `omp simd` do not guarantee.
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(64)));
  static constexpr int64_t V = lanes(sizeof(acc_t));
  static type load(const acc_t* p) {
    type v;
    std::memcpy(&v, p, sizeof(type));
    return v;
  }
  static void store(acc_t* p, const type& v) { std::memcpy(p, &v, sizeof(type)); }
  // sign(v) lane by lane as V int8 values (-1, 0 or 1) at p.
  static void store_sign(int8_t* p, const type& v) {
    const bytes s = signs(v);
    std::memcpy(p, &s, sizeof(bytes));
  }
  // The first m <= V values (the tail of a row): lanes m.. read as zero and are not written. With
  // AVX-512, masked loads and stores (with scalar loops for the tails, a 19-layer forward at n = 30
  // took 4-5x the time of one at n = 32).
  static type load_part(const acc_t* p, int64_t m) {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<acc_t, float>) {
      return reinterpret_cast<type>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1), p));
    } else if constexpr (std::is_same_v<acc_t, double>) {
      return reinterpret_cast<type>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << m) - 1), p));
    }
#endif
    type v{};
    std::memcpy(&v, p, m * sizeof(acc_t));
    return v;
  }
  static void store_part(acc_t* p, const type& v, int64_t m) {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<acc_t, float>) {
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << m) - 1), reinterpret_cast<__m512>(v));
      return;
    } else if constexpr (std::is_same_v<acc_t, double>) {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << m) - 1), reinterpret_cast<__m512d>(v));
      return;
    }
#endif
    std::memcpy(p, &v, m * sizeof(acc_t));
  }
  static void store_sign_part(int8_t* p, const type& v, int64_t m) {
    const bytes s = signs(v);
    std::memcpy(p, &s, m);
  }
  // sign(v) lane by lane, as acc_t values.
  static type sign(const type& v) { return __builtin_convertvector((v < 0) - (v > 0), type); }
  static acc_t sum(const type& v) {
    acc_t lane[V];
    store(lane, v);
    return tree_sum(lane);
  }

 private:
  typedef int8_t bytes __attribute__((vector_size(V)));
  static bytes signs(const type& v) { return __builtin_convertvector((v < 0) - (v > 0), bytes); }  // true is -1
};

// a . b with four independent vector accumulators (one is latency-bound on the adds).
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  constexpr int64_t V = lanes(sizeof(acc_t));
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
  for (; i + V <= n; i += V) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) s0[v] += a[i + v] * b[i + v];
  }
  acc_t ta[V] = {}, tb[V] = {};  // the tail, zero-padded to one vector (no serial chain of adds)
  if (i < n) {
    Vec<acc_t>::store(ta, Vec<acc_t>::load_part(a + i, n - i));
    Vec<acc_t>::store(tb, Vec<acc_t>::load_part(b + i, n - i));
  }
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) s0[v] = (s0[v] + s1[v]) + (s2[v] + s3[v]) + ta[v] * tb[v];
  return tree_sum(s0);
}

template <typename acc_t>
inline acc_t sum(const acc_t* __restrict a, int64_t n) {
  constexpr int64_t V = lanes(sizeof(acc_t));
  acc_t lane[V] = {};
  int64_t i = 0;
  for (; i + V <= n; i += V) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) lane[v] += a[i + v];
  }
  acc_t s = tree_sum(lane);
  for (; i < n; ++i) s += a[i];
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

// out = f(base + shift + sum_{m < M} coef[m] * src[m]) over `len` elements, in one pass; f is
// |.| when ABS. `base` may be nullptr (zero) or `out` itself; sources must not be `out`.
template <int M, bool ABS, typename acc_t>
inline void combine_pass(acc_t* out, const acc_t* base, acc_t shift, const acc_t* const* src, const acc_t* coef,
                         int64_t len) {
  const acc_t* s[M > 0 ? M : 1];
  acc_t c[M > 0 ? M : 1];
  for (int m = 0; m < M; ++m) {
    s[m] = src[m];
    c[m] = coef[m];
  }
  if (base != nullptr) {
#pragma omp simd
    for (int64_t q = 0; q < len; ++q) {
      acc_t v = base[q] + shift;
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) v += c[m] * s[m][q];
      out[q] = ABS ? std::abs(v) : v;
    }
  } else {
#pragma omp simd
    for (int64_t q = 0; q < len; ++q) {
      acc_t v = shift;
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) v += c[m] * s[m][q];
      out[q] = ABS ? std::abs(v) : v;
    }
  }
}

// out = f(base + shift + sum_{m < count} coef[m] * src[m]), eight sources per pass.
template <typename acc_t>
void combine(acc_t* out, const acc_t* base, acc_t shift, const acc_t* const* src, const acc_t* coef, int64_t count,
             int64_t len, bool take_abs) {
  int64_t first = 0;
  do {
    const int64_t m = std::min<int64_t>(8, count - first);
    const acc_t* b = first == 0 ? base : out;
    const acc_t sh = first == 0 ? shift : acc_t(0);
    const bool ab = take_abs && first + m >= count;
    const acc_t* const* s = src + first;
    const acc_t* c = coef + first;
#define HAN_COMBINE_CASE(M)                             \
  case M:                                               \
    if (ab) {                                           \
      combine_pass<M, true>(out, b, sh, s, c, len);  \
    } else {                                            \
      combine_pass<M, false>(out, b, sh, s, c, len); \
    }                                                   \
    break;
    switch (m) {
      HAN_COMBINE_CASE(0)
      HAN_COMBINE_CASE(1)
      HAN_COMBINE_CASE(2)
      HAN_COMBINE_CASE(3)
      HAN_COMBINE_CASE(4)
      HAN_COMBINE_CASE(5)
      HAN_COMBINE_CASE(6)
      HAN_COMBINE_CASE(7)
      HAN_COMBINE_CASE(8)
    }
#undef HAN_COMBINE_CASE
    first += m;
  } while (first < count);
}

// out = |a| or a (out may be a).
template <typename acc_t>
inline void activate(const acc_t* a, acc_t* out, int64_t n, bool take_abs) {
  if (take_abs) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = std::abs(a[i]);
  } else if (out != a) {
    std::copy(a, a + n, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Parameter-gradient sums
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct GradSums {
  std::vector<acc_t> du, dt, db;     // totals of this task
  std::vector<acc_t> bdu, bdt, bdb;  // the current block of rows
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

// Hands a task's sums to its thread's slot (a thread may run more than one task).
template <typename acc_t>
void store_sums(std::vector<GradSums<acc_t>*>& slots, GradSums<acc_t>* s) {
  if (s == nullptr) return;
  s->flush();
  GradSums<acc_t>*& slot = slots[at::get_thread_num()];
  if (slot == nullptr) {
    slot = s;
    return;
  }
  GradSums<acc_t>::add_and_clear(s->du, slot->du);
  GradSums<acc_t>::add_and_clear(s->dt, slot->dt);
  GradSums<acc_t>::add_and_clear(s->db, slot->db);
  delete s;
}

// Reduces the per-thread sums, in thread order, into the output gradients.
template <typename acc_t>
void reduce_sums(std::vector<GradSums<acc_t>*>& slots, acc_t* du, acc_t* dt, acc_t* db) {
  for (GradSums<acc_t>* s : slots) {
    if (s == nullptr) continue;
    for (size_t i = 0; i < s->du.size(); ++i) du[i] += s->du[i];
    for (size_t i = 0; i < s->dt.size(); ++i) dt[i] += s->dt[i];
    for (size_t i = 0; i < s->db.size(); ++i) db[i] += s->db[i];
    delete s;
  }
}

// ---------------------------------------------------------------------------------------------
// Rows (C == 1)
// ---------------------------------------------------------------------------------------------

// Pointers and coefficients handed to `combine`, sized once per task.
template <typename acc_t>
struct Terms {
  std::vector<const acc_t*> src;
  std::vector<acc_t> coef;
  explicit Terms(int64_t count) : src(count), coef(count) {}
};

// out = M^T p for one vector p of k values and a k x k matrix M (row-major): out_j = sum_m p_m M[m, j],
// m ascending, vectorised over j (as scaled rows of M summed: with the triangular matrices here the
// terms outside the triangle are exact zeros, so each sum equals the one over the triangle alone).
template <typename acc_t>
inline void vec_times_matrix(const acc_t* p, const acc_t* M, int64_t k, acc_t* out) {
  if (k == 1) {
    out[0] = p[0] * M[0];
    return;
  }
  using W = Vec<acc_t>;
  constexpr int64_t V = W::V;
  for (int64_t j0 = 0; j0 < k; j0 += V) {
    const int64_t cols = std::min(V, k - j0);
    typename W::type acc{};
    for (int64_t m = 0; m < k; ++m)
      acc += p[m] * (cols == V ? W::load(M + m * k + j0) : W::load_part(M + m * k + j0, cols));
    W::store_part(out + j0, acc, cols);
  }
}

// w = T^T p for one vector's k projections (T: the k x k upper-triangular WY factor).
template <typename acc_t>
inline void apply_wy_factor(const acc_t* t, int64_t k, const acc_t* p, acc_t* w) {
  vec_times_matrix(p, t, k, w);
}

// p = U a, w = T^T p for layer l.
template <typename acc_t>
inline void project(const Chain<acc_t>& c, int64_t l, const acc_t* a, acc_t* p, acc_t* w) {
  const int64_t k = c.k, n = c.n;
  const acc_t* u = c.ul(l);
  const acc_t* t = c.tl(l);
  for (int64_t j = 0; j < k; ++j) p[j] = dot(a, u + j * n, n);
  apply_wy_factor(t, k, p, w);
}

// One reflection (k = 1): out = f(a - w0 u + b), f = |.| for abs layers. `out` may be `a` (in place).
// (k > 1 goes through the row groups below.)
template <typename acc_t>
inline void apply_reflection(const Chain<acc_t>& c, int64_t l, const acc_t* a, acc_t w0, acc_t* out) {
  const int64_t n = c.n;
  const acc_t* __restrict u = c.ul(l);
  const acc_t* __restrict b = c.bl(l);
  if (c.abs[l]) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = std::abs(a[i] - w0 * u[i] + b[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] - w0 * u[i] + b[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Row groups (k > 1): R rows share every load of U. Per row, the k dot products U a and the
// k-term update a - U^T w each read all of U (k n values, from L1/L2) for k n multiply-adds, so
// those loads, not the arithmetic, bound them; over a group of R rows each value of U is loaded
// once for R multiply-adds, with the group's accumulators in registers (kSharedRows x kDirections
// of them in a dot-product pass, kSharedRows x kChunksInFlight in an update).
// ---------------------------------------------------------------------------------------------

// Whether the forward runs rows in groups: always with k > 1 (they share each load of U); with one
// reflection when rows are short or the chain deep, so that the group's independent rows hide the
// latency of each row's dot product -> update -> next layer chain. One thread, the tails of rows as
// partial vectors: 19 layers at 100 or 2,048 rows, 1.6-1.8x faster at n = 200 to 1024 (4x at n = 30);
// one or two layers of 8192 rows are memory-bound, and as fast or slower in groups at n = 384 and 768.
// The backward groups k = 1 rows only when they are short: 2x faster at n = 30, 1.2x at 64, level at
// 128, 7% slower at n = 200 and 19 layers, where its fused per-row pass has work enough.
inline bool forward_in_row_groups(int64_t k, int64_t n, int64_t L) {
  return k > 1 || n <= kGroupedMaxFeatures || L >= kGroupedMinLayers;
}
inline bool backward_in_row_groups(int64_t k, int64_t n) { return k > 1 || n <= kGroupedMaxFeatures; }

// Calls f(std::integral_constant<int, nr>{}) for 1 <= nr <= kSharedRows.
template <typename F>
inline void with_group_size(int64_t nr, F&& f) {
  switch (nr) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
#ifdef __AVX512F__
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
#endif
    default: TORCH_CHECK(false, "householder_chain: bad row group size ", nr);
  }
}

// out[r * stride + j] = a_r . u_j for r < R, j < J (u_j = u + j n): each load of a row of the
// group serves J directions and each load of u R rows.
template <int R, int J, typename acc_t>
inline void dot_rows(const acc_t* const* a, const acc_t* __restrict u, int64_t n, acc_t* out, int64_t stride) {
  using W = Vec<acc_t>;
  constexpr int64_t V = W::V;
  typename W::type s[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) s[r][j] = typename W::type{};
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    typename W::type uv[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) uv[j] = W::load(u + j * n + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename W::type av = W::load(a[r] + i);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) s[r][j] += av * uv[j];
    }
  }
  if (i < n) {  // the tail, fewer than V values
    typename W::type uv[J];
    for (int j = 0; j < J; ++j) uv[j] = W::load_part(u + j * n + i, n - i);
    for (int r = 0; r < R; ++r) {
      const typename W::type av = W::load_part(a[r] + i, n - i);
      for (int j = 0; j < J; ++j) s[r][j] += av * uv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) out[r * stride + j] = W::sum(s[r][j]);
}

// p[r k + j] = a_r . u_j for r < R and all k directions.
template <int R, typename acc_t>
inline void project_dots(const acc_t* const* a, const acc_t* u, int64_t k, int64_t n, acc_t* p) {
  int64_t j = 0;
  for (; j + kDirections <= k; j += kDirections) dot_rows<R, kDirections>(a, u + j * n, n, p + j, k);
  for (; j < k; ++j) dot_rows<R, 1>(a, u + j * n, n, p + j, k);
}

// The same projections from U transposed (ut: n x kp, directions zero-padded to whole vectors), for
// many directions: the directions run along the vector lanes, so step i broadcasts a_r[i] against
// row i of ut into row r's accumulators (2R vectors), with no horizontal sum at the end. Each row's
// sums run in the same order whatever R is. k = 16, n = 768, 256 rows (in cache), one thread: 2.5x
// the multiply-add rate of project_dots, whose k / kDirections passes each end in R kDirections
// horizontal sums (a standalone loop; HanLayer(768, k = 16) at 8192 rows, with the vectorised
// T products: forward 1.28x, backward 1.11x faster).
template <int R, typename acc_t>
inline void project_dots_transposed(const acc_t* const* a, const acc_t* __restrict ut, int64_t k, int64_t kp, int64_t n,
                                    acc_t* p) {
  using W = Vec<acc_t>;
  using vec = typename W::type;
  constexpr int64_t V = W::V;
  for (int64_t j0 = 0; j0 < kp; j0 += 2 * V) {
    // two vectors of directions at a time, or the last one split over even and odd i (either way
    // 2R independent accumulators)
    const bool pair = j0 + 2 * V <= kp;
    vec s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = vec{};
    if (pair) {
      for (int64_t i = 0; i < n; ++i) {
        const vec u0 = W::load(ut + i * kp + j0), u1 = W::load(ut + i * kp + j0 + V);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          s[r][0] += a[r][i] * u0;
          s[r][1] += a[r][i] * u1;
        }
      }
    } else {
      int64_t i = 0;
      for (; i + 2 <= n; i += 2) {
        const vec u0 = W::load(ut + i * kp + j0), u1 = W::load(ut + (i + 1) * kp + j0);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          s[r][0] += a[r][i] * u0;
          s[r][1] += a[r][i + 1] * u1;
        }
      }
      if (i < n) {
        const vec u0 = W::load(ut + i * kp + j0);
        for (int r = 0; r < R; ++r) s[r][0] += a[r][i] * u0;
      }
      for (int r = 0; r < R; ++r) {
        s[r][0] += s[r][1];
        s[r][1] = vec{};
      }
    }
    // the k real directions of each row (store_part of a whole vector stores all of it); a pair's second
    // vector holds at least one, as kp rounds k up to whole vectors
    const int64_t m0 = std::min<int64_t>(V, k - j0), m1 = std::min<int64_t>(V, k - j0 - V);
    for (int r = 0; r < R; ++r) {
      W::store_part(p + r * k + j0, s[r][0], m0);
      if (pair) W::store_part(p + r * k + j0 + V, s[r][1], m1);
    }
  }
}

// U a_r (R rows) for layer l, from U transposed where the chain keeps it.
template <int R, typename acc_t>
inline void project_group(const Chain<acc_t>& c, int64_t l, const acc_t* const* a, acc_t* p) {
  if (c.ut != nullptr) {
    project_dots_transposed<R>(a, c.utl(l), c.k, c.kp, c.n, p);
  } else {
    project_dots<R>(a, c.ul(l), c.k, c.n, p);
  }
}

// For r < R: zv = a_r + b - sum_j coef[r k + j] u_j (b may be nullptr: zero); z_r = zv when z is
// given, sign_r = sign(zv) (int8) when sign is given, out_r = |zv| (ABS) or zv when out is given
// (out_r may be a_r: each chunk is read before it is written). C chunks of V values per row are in
// flight, so each broadcast coefficient serves C multiply-adds and each load of u R of them.
// NEXT (k = 1, out given): also p_next[r] = out_r . u_next, the next layer's projection, from the
// values as they are stored (the same sums, in the same order, as a dot_rows pass over out).
template <int R, bool ABS, bool NEXT, typename acc_t>
inline void update_rows(const acc_t* const* a, const acc_t* b, const acc_t* u, const acc_t* coef, int64_t k,
                        int64_t n, acc_t* const* out, acc_t* const* z, int8_t* const* sign,
                        const acc_t* __restrict u_next, acc_t* p_next) {
  using W = Vec<acc_t>;
  using vec = typename W::type;
  constexpr int64_t V = W::V;
  constexpr int C = kChunksInFlight;
  const auto activate = [](const vec& v) { return ABS ? (v < 0 ? -v : v) : v; };
  vec dots[NEXT ? R : 1];
  if constexpr (NEXT) {
    for (int r = 0; r < R; ++r) dots[r] = vec{};
  }
  int64_t i = 0;
  for (; i + C * V <= n; i += C * V) {
    vec acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < C; ++q) {
        acc[r][q] = W::load(a[r] + i + q * V);
        if (b != nullptr) acc[r][q] += W::load(b + i + q * V);
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      vec uj[C];
#pragma GCC unroll 4
      for (int q = 0; q < C; ++q) uj[q] = W::load(u + j * n + i + q * V);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const acc_t cr = coef[r * k + j];
#pragma GCC unroll 4
        for (int q = 0; q < C; ++q) acc[r][q] -= cr * uj[q];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < C; ++q) {
        if (z != nullptr) W::store(z[r] + i + q * V, acc[r][q]);
        if (sign != nullptr) W::store_sign(sign[r] + i + q * V, acc[r][q]);
        if (out != nullptr) {
          const vec v = activate(acc[r][q]);
          W::store(out[r] + i + q * V, v);
          if constexpr (NEXT) dots[r] += v * W::load(u_next + i + q * V);
        }
      }
    }
  }
  for (; i + V <= n; i += V) {  // one chunk per row in flight
    vec acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r] = W::load(a[r] + i);
      if (b != nullptr) acc[r] += W::load(b + i);
    }
    for (int64_t j = 0; j < k; ++j) {
      const vec uj = W::load(u + j * n + i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] -= coef[r * k + j] * uj;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (z != nullptr) W::store(z[r] + i, acc[r]);
      if (sign != nullptr) W::store_sign(sign[r] + i, acc[r]);
      if (out != nullptr) {
        const vec v = activate(acc[r]);
        W::store(out[r] + i, v);
        if constexpr (NEXT) dots[r] += v * W::load(u_next + i);
      }
    }
  }
  if (i < n) {  // the tail, fewer than V values
    const int64_t m = n - i;
    vec acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r] = W::load_part(a[r] + i, m);
      if (b != nullptr) acc[r] += W::load_part(b + i, m);
    }
    for (int64_t j = 0; j < k; ++j) {
      const vec uj = W::load_part(u + j * n + i, m);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] -= coef[r * k + j] * uj;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (z != nullptr) W::store_part(z[r] + i, acc[r], m);
      if (sign != nullptr) W::store_sign_part(sign[r] + i, acc[r], m);
      if (out != nullptr) {
        const vec v = activate(acc[r]);
        W::store_part(out[r] + i, v, m);
        if constexpr (NEXT) dots[r] += v * W::load_part(u_next + i, m);
      }
    }
  }
  if constexpr (NEXT) {
    for (int r = 0; r < R; ++r) p_next[r] = W::sum(dots[r]);
  }
}

// p_r = U a_r, w_r = T^T p_r for the R rows of a group (p, w: R x k, row-major).
template <int R, typename acc_t>
inline void project_rows(const Chain<acc_t>& c, int64_t l, const acc_t* const* a, acc_t* p, acc_t* w) {
  const int64_t k = c.k;
  const acc_t* t = c.tl(l);
  project_group<R>(c, l, a, p);
  for (int r = 0; r < R; ++r) apply_wy_factor(t, k, p + r * k, w + r * k);
}

// One layer over a group: z_r = a_r - U^T w_r + b, out_r = f(z_r), sign_r = sign(z_r) (any may be nullptr).
template <int R, typename acc_t>
inline void apply_rows(const Chain<acc_t>& c, int64_t l, const acc_t* const* a, const acc_t* w, acc_t* const* out,
                       acc_t* const* z, int8_t* const* sign = nullptr) {
  if (c.abs[l] && out != nullptr) {
    update_rows<R, true, false, acc_t>(a, c.bl(l), c.ul(l), w, c.k, c.n, out, z, sign, nullptr, nullptr);
  } else {
    update_rows<R, false, false, acc_t>(a, c.bl(l), c.ul(l), w, c.k, c.n, out, z, sign, nullptr, nullptr);
  }
}

// k = 1: layer l over a group (out_r = f(z_r)) fused with the next layer's projections: p_next and
// w_next (R values each) for layer l + 1 from the values as they are written, so a deep chain reads
// each layer's output once instead of twice (19 layers at n = 200: forward 1.1-1.3x faster).
template <int R, typename acc_t>
inline void apply_rows_then_project(const Chain<acc_t>& c, int64_t l, const acc_t* const* a, const acc_t* w,
                                    acc_t* const* out, acc_t* p_next, acc_t* w_next) {
  const acc_t* u_next = c.ul(l + 1);
  if (c.abs[l]) {
    update_rows<R, true, true, acc_t>(a, c.bl(l), c.ul(l), w, 1, c.n, out, nullptr, nullptr, u_next, p_next);
  } else {
    update_rows<R, false, true, acc_t>(a, c.bl(l), c.ul(l), w, 1, c.n, out, nullptr, nullptr, u_next, p_next);
  }
  for (int r = 0; r < R; ++r) apply_wy_factor(c.tl(l + 1), 1, p_next + r, w_next + r);
}

// Forward over groups of kSharedRows rows (see "Row groups" and forward_in_row_groups). For one layer (L = 1) it can
// also keep what the backward would otherwise recompute (see "Saved projections and signs"): the
// projections p = U x of every row in p_out (rows x k) and sign(z) in sign_out (rows x n, int8).
template <typename scalar_t, typename acc_t>
void rows_forward_grouped(const scalar_t* x, scalar_t* y, int64_t rows, const Chain<acc_t>& c,
                          acc_t* p_out = nullptr, int8_t* sign_out = nullptr) {
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t G = kSharedRows;
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t grain = std::max<int64_t>(G, kWorkPerTask / (n * k * L));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    auto [buf, p, w] = scratch_arrays<acc_t, 3>({G * n, G * k, G * k});
    int8_t* sign[G];
    const acc_t* a[G];
    acc_t* out[G];
    for (int64_t g0 = r0; g0 < r1; g0 += G) {
      const int64_t nr = std::min(G, r1 - g0);
      for (int64_t r = 0; r < nr; ++r) {
        if constexpr (kDirect) {
          a[r] = x + (g0 + r) * n;
        } else {
          convert(x + (g0 + r) * n, buf + r * n, n);
          a[r] = buf + r * n;
        }
      }
      if (sign_out != nullptr) {
        for (int64_t r = 0; r < nr; ++r) sign[r] = sign_out + (g0 + r) * n;
      }
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t r = 0; r < nr; ++r) {
          out[r] = buf + r * n;
          if constexpr (kDirect) {
            if (l == L - 1) out[r] = y + (g0 + r) * n;
          }
        }
        with_group_size(nr, [&](auto R) {
          if (k > 1 || l == 0) project_rows<R.value>(c, l, a, p, w);  // k = 1: layer l > 0's came with layer l - 1
          if (k == 1 && l + 1 < L) {
            apply_rows_then_project<R.value>(c, l, a, w, out, p, w);
          } else {
            apply_rows<R.value>(c, l, a, w, out, static_cast<acc_t* const*>(nullptr),
                                sign_out != nullptr ? sign : static_cast<int8_t* const*>(nullptr));
          }
        });
        for (int64_t r = 0; r < nr; ++r) a[r] = out[r];
      }
      if (p_out != nullptr) std::copy(p, p + nr * k, p_out + g0 * k);
      if constexpr (!kDirect) {
        for (int64_t r = 0; r < nr; ++r) convert(buf + r * n, y + (g0 + r) * n, n);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void rows_forward(const scalar_t* x, scalar_t* y, int64_t rows, const Chain<acc_t>& c) {
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // read x and write y in place
  const int64_t n = c.n, k = c.k, L = c.L;
  if (forward_in_row_groups(k, n, L)) {
    rows_forward_grouped(x, y, rows, c);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / (n * k * L));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    auto [buf, p, w] = scratch_arrays<acc_t, 3>({n, k, k});
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* a;
      if constexpr (kDirect) {
        a = x + r * n;
      } else {
        convert(x + r * n, buf, n);
        a = buf;
      }
      for (int64_t l = 0; l < L; ++l) {
        project(c, l, a, p, w);
        acc_t* out = buf;
        if constexpr (kDirect) {
          if (l == L - 1) out = y + r * n;
        }
        apply_reflection(c, l, a, w[0], out);
        a = out;
      }
      if constexpr (!kDirect) convert(buf, y + r * n, n);
    }
  });
}

// The backward of one layer over a group, in one pass over the chunks of its rows, for every j < k:
//     du_j -= sum_{r < R} (Gt[r k + j] a_r + w[r k + j] g_r),  db += sum_{r < R} g_r   (DU; du_j = du + j n)
//     g_out_r = g_r - sum_j Gt[r k + j] u_j                                           (DG; g_out_r may be g_r)
// Each chunk of the group's source rows is loaded once, into registers, for all k directions.
template <int R, bool DU, bool DG, typename acc_t>
inline void backprop_rows(acc_t* du, acc_t* db, const acc_t* u, int64_t k, int64_t n, const acc_t* const* a,
                          const acc_t* const* g, const acc_t* Gt, const acc_t* w, acc_t* const* g_out) {
  using W = Vec<acc_t>;
  using vec = typename W::type;
  constexpr int64_t V = W::V;
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    vec av[R], gv[R], gn[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (DU) av[r] = W::load(a[r] + i);
      gv[r] = W::load(g[r] + i);
      gn[r] = gv[r];
    }
    if constexpr (DU) {
      vec s = W::load(db + i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s += gv[r];
      W::store(db + i, s);
    }
    for (int64_t j = 0; j < k; ++j) {
      if constexpr (DU) {
        acc_t* d = du + j * n + i;
        vec c[4] = {W::load(d), vec{}, vec{}, vec{}};  // four short chains of multiply-adds, not one of 2R
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          c[r & 1] -= Gt[r * k + j] * av[r];
          c[2 + (r & 1)] -= w[r * k + j] * gv[r];
        }
        W::store(d, (c[0] + c[1]) + (c[2] + c[3]));
      }
      if constexpr (DG) {
        const vec uj = W::load(u + j * n + i);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) gn[r] -= Gt[r * k + j] * uj;
      }
    }
    if constexpr (DG) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) W::store(g_out[r] + i, gn[r]);
    }
  }
  if (i < n) {  // the tail, fewer than V values: the same with partial vectors
    const int64_t m = n - i;
    vec av[R], gv[R], gn[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (DU) av[r] = W::load_part(a[r] + i, m);
      gv[r] = W::load_part(g[r] + i, m);
      gn[r] = gv[r];
    }
    if constexpr (DU) {
      vec s = W::load_part(db + i, m);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s += gv[r];
      W::store_part(db + i, s, m);
    }
    for (int64_t j = 0; j < k; ++j) {
      if constexpr (DU) {
        acc_t* d = du + j * n + i;
        vec c[4] = {W::load_part(d, m), vec{}, vec{}, vec{}};
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          c[r & 1] -= Gt[r * k + j] * av[r];
          c[2 + (r & 1)] -= w[r * k + j] * gv[r];
        }
        W::store_part(d, (c[0] + c[1]) + (c[2] + c[3]), m);
      }
      if constexpr (DG) {
        const vec uj = W::load_part(u + j * n + i, m);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) gn[r] -= Gt[r * k + j] * uj;
      }
    }
    if constexpr (DG) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) W::store_part(g_out[r] + i, gn[r], m);
    }
  }
}

// The same as backprop_rows (DU when du is given, DG when g_out is), one source at a time: the
// parameter sums with `combine` over all nr rows, then each row's g on its own. For shallow chains
// of long rows (memory-bound), where backprop_rows' 2R + 2 streams measured 2-5% slower
// (one layer, 8192 x 768).
template <typename acc_t>
inline void backprop_each_row(acc_t* du, acc_t* db, const acc_t* u, int64_t k, int64_t n, int64_t nr,
                              const acc_t* const* a, const acc_t* const* g, const acc_t* Gt, const acc_t* w,
                              acc_t* const* g_out, Terms<acc_t>& terms) {
  for (int64_t r = 0; r < nr; ++r) {
    terms.src[r] = a[r];
    terms.src[nr + r] = g[r];
  }
  if (du != nullptr) {
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t r = 0; r < nr; ++r) {
        terms.coef[r] = -Gt[r * k + j];
        terms.coef[nr + r] = -w[r * k + j];
      }
      combine(du + j * n, du + j * n, acc_t(0), terms.src.data(), terms.coef.data(), 2 * nr, n, false);
    }
    for (int64_t r = 0; r < nr; ++r) terms.coef[nr + r] = 1;
    combine(db, db, acc_t(0), terms.src.data() + nr, terms.coef.data() + nr, nr, n, false);
  }
  if (g_out == nullptr) return;
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      terms.src[j] = u + j * n;
      terms.coef[j] = -Gt[r * k + j];
    }
    combine(g_out[r], g[r], acc_t(0), terms.src.data(), terms.coef.data(), k, n, false);
  }
}

// The backward's forward recompute in row groups over one block of nr <= kBlockRows rows (k > 1,
// and k = 1 where the forward runs in groups): acts[l][r] the input of layer l >= 1 (layer 0 reads
// x, or acts[0][r] when x is converted), zs[l][r] its pre-activation (unless zs is nullptr), p and
// w its projections (the layouts of rows_backward).
template <typename scalar_t, typename acc_t>
void recompute_grouped(const Chain<acc_t>& c, const scalar_t* x, int64_t b0, int64_t nr, acc_t* acts, acc_t* zs,
                       acc_t* p, acc_t* w) {
  constexpr int64_t R = kBlockRows;
  const int64_t n = c.n, k = c.k, L = c.L;
  const acc_t* cur[R];
  for (int64_t r = 0; r < nr; ++r) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      cur[r] = x + (b0 + r) * n;
    } else {
      convert(x + (b0 + r) * n, acts + r * n, n);
      cur[r] = acts + r * n;
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    acc_t* z[R];
    acc_t* next[R];
    const bool last = l + 1 == L;
    for (int64_t r = 0; r < nr; ++r) {
      z[r] = zs != nullptr ? zs + (l * R + r) * n : nullptr;
      next[r] = last ? nullptr : acts + ((l + 1) * R + r) * n;
    }
    for (int64_t q0 = 0; q0 < nr; q0 += kSharedRows) {
      with_group_size(std::min(kSharedRows, nr - q0), [&](auto Rg) {
        acc_t* pl = p + (l * R + q0) * k;
        acc_t* wl = w + (l * R + q0) * k;
        if (k == 1 && !last && zs == nullptr) {  // k = 1: layer l + 1's projections with layer l's output
          if (l == 0) project_rows<Rg.value>(c, l, cur + q0, pl, wl);
          apply_rows_then_project<Rg.value>(c, l, cur + q0, wl, next + q0, pl + R, wl + R);
          return;
        }
        if (k > 1 || l == 0 || zs != nullptr) project_rows<Rg.value>(c, l, cur + q0, pl, wl);
        if (!last || zs != nullptr) {
          apply_rows<Rg.value>(c, l, cur + q0, wl, last ? static_cast<acc_t* const*>(nullptr) : next + q0,
                               zs != nullptr ? z + q0 : static_cast<acc_t* const*>(nullptr));
        }
      });
    }
    if (!last) {
      for (int64_t r = 0; r < nr; ++r) cur[r] = next[r];
    }
  }
}

// Backward over blocks of R rows. Per block: recompute the chain's inputs of layers 1..L-1 (and,
// for k > 1, every z), then per layer from the last: g <- g * sign(z), G = U g, G' = T G; then
// the parameter sums and g <- g - U^T G' (written straight into dL/dx for layer 0) in one pass
// over each group of rows (`backprop_rows`; 19 layers of 100 rows at n = 200, backward 1.07-1.13x
// faster than a pass for each), or for shallow chains of long rows one sum at a time
// (`backprop_each_row`). For k = 1, sign(z) is recomputed on the fly (one fused pass per row
// that also computes G), which saves storing z.
//
// Saved projections and signs (one layer, k > 1): when the forward kept p = U x and sign(z) of every
// row (saved_p, saved_sign; saved_sign only for an abs layer), the backward takes them instead of
// recomputing: it skips two of its six k n multiply-adds per row for 1 + 4k/n bytes per value kept.
template <typename scalar_t, typename acc_t>
void rows_backward(const scalar_t* gy, const scalar_t* x, scalar_t* dx, int64_t rows, const Chain<acc_t>& c,
                   bool need_params, acc_t* du, acc_t* dt, acc_t* db, const acc_t* saved_p = nullptr,
                   const int8_t* saved_sign = nullptr) {
  constexpr int64_t R = kBlockRows;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // read x and dL/dy rows in place
  const int64_t n = c.n, k = c.k, L = c.L;
  const bool grouped = backward_in_row_groups(k, n);
  // The forward recompute in row groups where the forward itself runs so (a deep chain's per-row
  // backward pass then reads the same acts, p and w, and recomputes sign(z) on the fly).
  const bool recompute_in_groups = grouped || forward_in_row_groups(k, n, L);
  const int64_t grain = std::max<int64_t>(R, kWorkPerTask / (3 * n * k * L));
  std::vector<GradSums<acc_t>*> slots(at::get_num_threads(), nullptr);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    auto [acts, zs, gbuf, p, w, G, Gt] =
        scratch_arrays<acc_t, 7>({L * R * n, grouped ? L * R * n : 0, R * n, L * R * k, L * R * k, R * k, R * k});
    GradSums<acc_t>* s = need_params ? new GradSums<acc_t>(L, k, n) : nullptr;
    Terms<acc_t> terms(recompute_in_groups ? 0 : std::max<int64_t>(2 * R, k));
    const acc_t* a_rows[R];
    for (int64_t b0 = r0; b0 < r1; b0 += R) {
      const int64_t nr = std::min(R, r1 - b0);
      // Forward recompute: acts[l][r] is the input of layer l >= 1 (layer 0 reads x).
      if (grouped && saved_p != nullptr) {  // L = 1: p and w from the forward's p; dL/dy * sign(z) below
        for (int64_t r = 0; r < nr; ++r) {
          std::copy(saved_p + (b0 + r) * k, saved_p + (b0 + r + 1) * k, p + r * k);
          apply_wy_factor(c.tl(0), k, p + r * k, w + r * k);
          if constexpr (!kDirect) convert(x + (b0 + r) * n, acts + r * n, n);
        }
      } else if (recompute_in_groups) {
        recompute_grouped<scalar_t>(c, x, b0, nr, acts, grouped ? zs : nullptr, p, w);
      } else for (int64_t r = 0; r < nr; ++r) {
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
          if (next != nullptr) apply_reflection(c, l, cur, wl[0], next);
          cur = next;
        }
      }
      for (int64_t l = L - 1; l >= 0; --l) {
        const acc_t* __restrict u = c.ul(l);
        const acc_t* __restrict b = c.bl(l);
        const acc_t* tt = c.ttl(l);
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
          if (!grouped) {
            const acc_t w0 = w[(l * R + r) * k];
            if (take_abs) {  // g = dL/dy * sign(z), z recomputed, and G = g . u, in one pass
              constexpr int64_t V = lanes(sizeof(acc_t));
              acc_t lane[V] = {};
              int64_t i = 0;
              for (; i + V <= n; i += V) {
#pragma omp simd
                for (int64_t v = 0; v < V; ++v) {
                  const acc_t gi = gsrc[i + v] * sign_of(a[i + v] - w0 * u[i + v] + b[i + v]);
                  g[i + v] = gi;
                  lane[v] += gi * u[i + v];
                }
              }
              if (i < n) {  // the tail, as one partial vector
                using W = Vec<acc_t>;
                const int64_t m = n - i;
                const auto ut = W::load_part(u + i, m);
                const auto gt = W::load_part(gsrc + i, m) *
                                W::sign(W::load_part(a + i, m) - w0 * ut + W::load_part(b + i, m));
                W::store_part(g + i, gt, m);
                W::store(lane, W::load(lane) + gt * ut);
              }
              Gr[0] = tree_sum(lane);
            } else {
              if (gsrc != g) std::copy(gsrc, gsrc + n, g);
              Gr[0] = dot(g, u, n);
            }
          } else {
            const acc_t* __restrict z = zs + (l * R + r) * n;
            if (take_abs && saved_sign != nullptr) {
              const int8_t* __restrict sr = saved_sign + (b0 + r) * n;
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) g[i] = gsrc[i] * static_cast<acc_t>(sr[i]);
            } else if (take_abs) {
#pragma omp simd
              for (int64_t i = 0; i < n; ++i) g[i] = gsrc[i] * sign_of(z[i]);
            } else if (gsrc != g) {
              std::copy(gsrc, gsrc + n, g);
            }
          }
        }
        if (grouped) {  // G = U g, over groups of rows
          const acc_t* g_rows[R];
          for (int64_t r = 0; r < nr; ++r) g_rows[r] = gbuf + r * n;
          for (int64_t q0 = 0; q0 < nr; q0 += kSharedRows) {
            with_group_size(std::min(kSharedRows, nr - q0), [&](auto Rg) {
              project_group<Rg.value>(c, l, g_rows + q0, G + q0 * k);
            });
          }
        }
        // G' = T G (tt = T^T)
        for (int64_t r = 0; r < nr; ++r) vec_times_matrix(G + r * k, tt, k, Gt + r * k);
        const bool need_dg = l > 0 || dx != nullptr;
        if (s != nullptr) {  // dT -= sum_r p_r G_r^T (du and db below)
          acc_t* dt = s->bdt.data() + l * k * k;
          const acc_t* pl = p + l * R * k;
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t m = 0; m < k; ++m)
              for (int64_t j = 0; j < k; ++j) dt[m * k + j] -= pl[r * k + m] * G[r * k + j];
        }
        // du, db sums and g <- g - U^T G' (into dL/dx for layer 0), in one pass over each group of rows
        const acc_t* g_in[R];
        acc_t* g_out[R];
        for (int64_t r = 0; r < nr; ++r) {
          g_in[r] = gbuf + r * n;
          g_out[r] = gbuf + r * n;
          if constexpr (kDirect) {
            if (l == 0 && need_dg) g_out[r] = dx + (b0 + r) * n;
          }
        }
        acc_t* du_l = s != nullptr ? s->bdu.data() + l * k * n : nullptr;
        acc_t* db_l = s != nullptr ? s->bdb.data() + l * n : nullptr;
        const acc_t* wl = w + l * R * k;
        if (!recompute_in_groups) {
          backprop_each_row(du_l, db_l, u, k, n, nr, a_rows, g_in, Gt, wl, need_dg ? g_out : nullptr, terms);
        } else for (int64_t q0 = 0; q0 < nr; q0 += kSharedRows) {
          with_group_size(std::min(kSharedRows, nr - q0), [&](auto Rg) {
            const auto run = [&](auto with_du, auto with_dg) {
              backprop_rows<Rg.value, with_du.value, with_dg.value>(du_l, db_l, u, k, n, a_rows + q0, g_in + q0,
                                                                    Gt + q0 * k, wl + q0 * k, g_out + q0);
            };
            if (du_l != nullptr && need_dg) {
              run(std::true_type{}, std::true_type{});
            } else if (du_l != nullptr) {
              run(std::true_type{}, std::false_type{});
            } else if (need_dg) {
              run(std::false_type{}, std::true_type{});
            }
          });
        }
        if constexpr (!kDirect) {
          if (l == 0 && need_dg) {
            for (int64_t r = 0; r < nr; ++r) convert(gbuf + r * n, dx + (b0 + r) * n, n);
          }
        }
      }
      if (s != nullptr) s->rows_done(nr);
    }
    store_sums(slots, s);
  });
  if (need_params) reduce_sums(slots, du, dt, db);
}

// ---------------------------------------------------------------------------------------------
// Column tiles (C > 1): the vectors are the columns of each (n, C) slab; a task is a tile of
// `cw` adjacent columns of one slab, each of its n rows a run of cw contiguous values.
// ---------------------------------------------------------------------------------------------

// P_j = sum_r u_j[r] A_r, W_j = sum_{m <= j} T[m, j] P_m, for the rows A_r of a tile.
template <typename acc_t>
inline void cols_project(const Chain<acc_t>& c, int64_t l, const acc_t* const* a_rows, int64_t cw, acc_t* P, acc_t* W,
                         Terms<acc_t>& terms) {
  const int64_t k = c.k, n = c.n;
  const acc_t* u = c.ul(l);
  const acc_t* t = c.tl(l);
  for (int64_t j = 0; j < k; ++j) combine(P + j * cw, static_cast<const acc_t*>(nullptr), acc_t(0), a_rows, u + j * n, n, cw, false);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t m = 0; m <= j; ++m) {
      terms.src[m] = P + m * cw;
      terms.coef[m] = t[m * k + j];
    }
    combine(W + j * cw, static_cast<const acc_t*>(nullptr), acc_t(0), terms.src.data(), terms.coef.data(), j + 1, cw, false);
  }
}

// Row r of a tile: out_r = f(a_r + b[r] - sum_j u_j[r] W_j), or z_r = a_r + b[r] - ... when z_rows is given.
template <typename acc_t>
inline void cols_apply_row(const Chain<acc_t>& c, int64_t l, int64_t r, const acc_t* a_r, const acc_t* W, int64_t cw,
                           acc_t* out_r, acc_t* z_r, Terms<acc_t>& terms) {
  const int64_t k = c.k, n = c.n;
  const acc_t* u = c.ul(l);
  for (int64_t j = 0; j < k; ++j) {
    terms.src[j] = W + j * cw;
    terms.coef[j] = -u[j * n + r];
  }
  const acc_t br = c.bl(l)[r];
  if (z_r == nullptr) {
    combine(out_r, a_r, br, terms.src.data(), terms.coef.data(), k, cw, c.abs[l] != 0);
  } else {
    combine(z_r, a_r, br, terms.src.data(), terms.coef.data(), k, cw, false);
    if (out_r != nullptr) activate(z_r, out_r, cw, c.abs[l] != 0);
  }
}

inline int64_t tile_width(int64_t n, int64_t copies, int64_t C) {
  int64_t cw = kTileElems / std::max<int64_t>(1, copies * n);
  cw = std::max<int64_t>(16, cw - cw % 16);
  return std::min(cw, C);
}

template <typename scalar_t, typename acc_t>
void cols_forward(const scalar_t* x, scalar_t* y, int64_t B, int64_t C, const Chain<acc_t>& c) {
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t cw_max = tile_width(n, 1, C);
  const int64_t tiles = (C + cw_max - 1) / cw_max;
  at::parallel_for(0, B * tiles, 1, [&](int64_t i0, int64_t i1) {
    auto [A, P, W] = scratch_arrays<acc_t, 3>({n * cw_max, k * cw_max, k * cw_max});
    Terms<acc_t> terms(std::max(n, k));
    std::vector<const acc_t*> in_rows(n);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bi = item / tiles, c0 = (item % tiles) * cw_max, cw = std::min(cw_max, C - c0);
      const int64_t off = bi * n * C + c0;
      for (int64_t r = 0; r < n; ++r) {
        if constexpr (kDirect) {
          in_rows[r] = x + off + r * C;
        } else {
          convert(x + off + r * C, A + r * cw, cw);
          in_rows[r] = A + r * cw;
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        cols_project(c, l, in_rows.data(), cw, P, W, terms);
        for (int64_t r = 0; r < n; ++r) {
          acc_t* out = A + r * cw;
          if constexpr (kDirect) {
            if (l == L - 1) out = y + off + r * C;
          }
          cols_apply_row(c, l, r, in_rows[r], W, cw, out, static_cast<acc_t*>(nullptr), terms);
          in_rows[r] = out;
        }
      }
      if constexpr (!kDirect) {
        for (int64_t r = 0; r < n; ++r) convert(A + r * cw, y + off + r * C, cw);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void cols_backward(const scalar_t* gy, const scalar_t* x, scalar_t* dx, int64_t B, int64_t C, const Chain<acc_t>& c,
                   bool need_params, acc_t* du, acc_t* dt, acc_t* db) {
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t n = c.n, k = c.k, L = c.L;
  const int64_t cw_max = tile_width(n, 2 * L + 1, C);
  const int64_t tiles = (C + cw_max - 1) / cw_max;
  std::vector<GradSums<acc_t>*> slots(at::get_num_threads(), nullptr);
  at::parallel_for(0, B * tiles, 1, [&](int64_t i0, int64_t i1) {
    const int64_t tile = n * cw_max, kt = k * cw_max;
    // acts[l]: input of layer l (l >= 1, or a converted x); zs[l]: its pre-activation.
    auto [acts, zs, g, P, W, G, Gt] = scratch_arrays<acc_t, 7>({L * tile, L * tile, tile, L * kt, L * kt, kt, kt});
    GradSums<acc_t>* s = need_params ? new GradSums<acc_t>(L, k, n) : nullptr;
    Terms<acc_t> terms(std::max(n, k));
    std::vector<const acc_t*> in_rows(L * n), g_rows(n);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bi = item / tiles, c0 = (item % tiles) * cw_max, cw = std::min(cw_max, C - c0);
      const int64_t off = bi * n * C + c0;
      for (int64_t r = 0; r < n; ++r) {
        if constexpr (kDirect) {
          in_rows[r] = x + off + r * C;
        } else {
          convert(x + off + r * C, acts + r * cw, cw);
          in_rows[r] = acts + r * cw;
        }
        g_rows[r] = g + r * cw;
      }
      for (int64_t l = 0; l < L; ++l) {  // forward recompute
        cols_project(c, l, in_rows.data() + l * n, cw, P + l * kt, W + l * kt, terms);
        for (int64_t r = 0; r < n; ++r) {
          acc_t* z_r = zs + l * tile + r * cw;
          acc_t* next = nullptr;
          if (l + 1 < L) next = c.abs[l] ? acts + (l + 1) * tile + r * cw : z_r;
          cols_apply_row(c, l, r, in_rows[l * n + r], W + l * kt, cw, next == z_r ? nullptr : next, z_r, terms);
          if (l + 1 < L) in_rows[(l + 1) * n + r] = next;
        }
      }
      for (int64_t l = L - 1; l >= 0; --l) {
        const acc_t* u = c.ul(l);
        const acc_t* t = c.tl(l);
        const acc_t* Pl = P + l * kt;
        const acc_t* Wl = W + l * kt;
        for (int64_t r = 0; r < n; ++r) {  // g <- dL/dy * sign(z) (or dL/dy)
          const acc_t* gsrc = g + r * cw;
          if (l == L - 1) {
            if constexpr (kDirect) {
              gsrc = gy + off + r * C;
            } else {
              convert(gy + off + r * C, g + r * cw, cw);
            }
          }
          acc_t* gr = g + r * cw;  // may be gsrc (in place)
          if (c.abs[l]) {
            const acc_t* z = zs + l * tile + r * cw;
#pragma omp simd
            for (int64_t q = 0; q < cw; ++q) gr[q] = gsrc[q] * sign_of(z[q]);
          } else if (gsrc != gr) {
            std::copy(gsrc, gsrc + cw, gr);
          }
        }
        for (int64_t j = 0; j < k; ++j) {  // G_j = sum_r u_j[r] g_r
          combine(G + j * cw, static_cast<const acc_t*>(nullptr), acc_t(0), g_rows.data(), u + j * n, n, cw, false);
        }
        for (int64_t j = 0; j < k; ++j) {  // G'_j = sum_{m >= j} T[j, m] G_m
          for (int64_t m = j; m < k; ++m) {
            terms.src[m - j] = G + m * cw;
            terms.coef[m - j] = t[j * k + m];
          }
          combine(Gt + j * cw, static_cast<const acc_t*>(nullptr), acc_t(0), terms.src.data(), terms.coef.data(), k - j,
                  cw, false);
        }
        if (s != nullptr) {
          acc_t* du_l = s->bdu.data() + l * k * n;
          acc_t* db_l = s->bdb.data() + l * n;
          acc_t* dt_l = s->bdt.data() + l * k * k;
          for (int64_t r = 0; r < n; ++r) {
            const acc_t* a_r = in_rows[l * n + r];
            const acc_t* g_r = g + r * cw;
            for (int64_t j = 0; j < k; ++j) du_l[j * n + r] -= dot(Gt + j * cw, a_r, cw) + dot(Wl + j * cw, g_r, cw);
            db_l[r] += sum(g_r, cw);
          }
          for (int64_t m = 0; m < k; ++m)
            for (int64_t j = 0; j < k; ++j) dt_l[m * k + j] -= dot(Pl + m * cw, G + j * cw, cw);
        }
        if (l == 0 && dx == nullptr) break;
        for (int64_t r = 0; r < n; ++r) {  // g_r <- g_r - sum_j u_j[r] G'_j (into dL/dx for layer 0)
          for (int64_t j = 0; j < k; ++j) {
            terms.src[j] = Gt + j * cw;
            terms.coef[j] = -u[j * n + r];
          }
          acc_t* gr = g + r * cw;
          acc_t* out = gr;
          if constexpr (kDirect) {
            if (l == 0) out = dx + off + r * C;
          }
          combine(out, gr, acc_t(0), terms.src.data(), terms.coef.data(), k, cw, false);
          if constexpr (!kDirect) {
            if (l == 0) convert(gr, dx + off + r * C, cw);
          }
        }
      }
      if (s != nullptr) s->rows_done(1);
    }
    store_sums(slots, s);
  });
  if (need_params) reduce_sums(slots, du, dt, db);
}

// ---------------------------------------------------------------------------------------------
// Parameters: unit rows and the compact-WY factor, computed and differentiated in double
// ---------------------------------------------------------------------------------------------

constexpr double kTiny = 1e-30;  // as han_surgery.functional.unit_rows

// The values of a floating-point tensor as doubles, and doubles into a new tensor of a given dtype:
// plain loops, not Tensor::to (whose dispatch, allocation and copy cost about 9 us a call, six calls a
// training step of every chain: a tenth of a small HanNet's step).
std::vector<double> to_doubles(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<double> out(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "to_doubles", [&] {
    const scalar_t* src = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(src[i]);
  });
  return out;
}

at::Tensor from_doubles(const std::vector<double>& values, at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "from_doubles", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) dst[i] = static_cast<scalar_t>(values[i]);
  });
  return out;
}

// The chain's parameters as the kernels use them, and what their backward needs.
struct Prepared {
  int64_t L = 0, k = 0, n = 0;
  bool normalize = false;
  std::vector<double> uhat;   // (L, k, n): the unit rows (u itself when not normalising)
  std::vector<double> t;      // (L, k, k): T = (triu(U U^T, 1) + I/2)^{-1}
  std::vector<double> scale;  // (L * k): max |u| of each row, clamped to kTiny
  std::vector<double> norm;   // (L * k): || u / scale || of each row
};

// unit_rows (when normalize) and wy_factor of han_surgery.functional, for u of shape (L, k, n).
// Runs on every call, forward and backward, so its loops are vectorised: as serial scalar loops they
// took 9 of the 23 us of a 19-layer, one-row forward at n = 200 (the per-call cost of small models).
Prepared prepare(const at::Tensor& u, bool normalize) {
  Prepared P;
  P.L = u.size(0), P.k = u.size(1), P.n = u.size(2), P.normalize = normalize;
  const int64_t L = P.L, k = P.k, n = P.n;
  P.uhat = to_doubles(u);
  if (normalize) {
    P.scale.resize(L * k);
    P.norm.resize(L * k);
    for (int64_t row = 0; row < L * k; ++row) {
      double* v = P.uhat.data() + row * n;
      double peak = 0;
#pragma omp simd reduction(max : peak)
      for (int64_t i = 0; i < n; ++i) peak = std::max(peak, std::abs(v[i]));
      const double scale = std::max(peak, kTiny);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] /= scale;
      const double norm = std::sqrt(dot(v, v, n));
      const double inv_norm = 1.0 / std::max(norm, kTiny);  // one division per row, not per value
      for (int64_t i = 0; i < n; ++i) v[i] *= inv_norm;
      P.scale[row] = scale;
      P.norm[row] = norm;
    }
  }
  P.t.assign(L * k * k, 0.0);
  for (int64_t l = 0; l < L; ++l) {
    double* t = P.t.data() + l * k * k;
    const double* uh = P.uhat.data() + l * k * n;
    if (k == 1) {
      t[0] = 2.0;
      continue;
    }
    std::vector<double> a(k * k, 0.0);  // A = triu(U U^T, 1) + I / 2
    for (int64_t i = 0; i < k; ++i) {
      a[i * k + i] = 0.5;
      for (int64_t m = i + 1; m < k; ++m) {
        double d = 0;
        for (int64_t q = 0; q < n; ++q) d += uh[i * n + q] * uh[m * n + q];
        a[i * k + m] = d;
      }
    }
    for (int64_t col = 0; col < k; ++col) {  // T = A^{-1} by back substitution (upper triangular)
      for (int64_t i = col; i >= 0; --i) {
        double v = i == col ? 1.0 : 0.0;
        for (int64_t m = i + 1; m <= col; ++m) v -= a[i * k + m] * t[m * k + col];
        t[i * k + col] = v / a[i * k + i];
      }
    }
  }
  return P;
}

// du (double, (L, k, n)) from the kernels' dL/dU-hat and dL/dT: first through T (dA = -T^T dT T^T,
// A_jm = u_j . u_m for j < m), then through the normalisation (dv = (du - u (u . du)) / ||v||,
// du = dv / scale; the scale is a constant, as in unit_rows).
template <typename acc_t>
std::vector<double> parameter_backward(const Prepared& P, const acc_t* duhat_acc, const acc_t* dt_acc) {
  const int64_t L = P.L, k = P.k, n = P.n;
  std::vector<double> du(duhat_acc, duhat_acc + L * k * n);
  if (k > 1) {
    std::vector<double> m1(k * k), da(k * k);
    for (int64_t l = 0; l < L; ++l) {
      const double* t = P.t.data() + l * k * k;
      const acc_t* dt = dt_acc + l * k * k;
      for (int64_t i = 0; i < k; ++i)  // m1 = dT T^T
        for (int64_t j = 0; j < k; ++j) {
          double v = 0;
          for (int64_t q = 0; q < k; ++q) v += static_cast<double>(dt[i * k + q]) * t[j * k + q];
          m1[i * k + j] = v;
        }
      for (int64_t i = 0; i < k; ++i)  // dA = -T^T m1
        for (int64_t j = 0; j < k; ++j) {
          double v = 0;
          for (int64_t q = 0; q < k; ++q) v += t[q * k + i] * m1[q * k + j];
          da[i * k + j] = -v;
        }
      const double* uh = P.uhat.data() + l * k * n;
      double* dul = du.data() + l * k * n;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t m = j + 1; m < k; ++m) {
          const double s = da[j * k + m];
          for (int64_t q = 0; q < n; ++q) {
            dul[j * n + q] += s * uh[m * n + q];
            dul[m * n + q] += s * uh[j * n + q];
          }
        }
    }
  }
  if (P.normalize) {
    for (int64_t row = 0; row < L * k; ++row) {
      const double* uh = P.uhat.data() + row * n;
      double* d = du.data() + row * n;
      const double norm = P.norm[row], scale = P.scale[row];
      const double proj = norm <= kTiny ? 0.0 : dot(uh, d, n);  // clamp_min passes no gradient to the norm
      const double inv_denom = 1.0 / (std::max(norm, kTiny) * scale);
      for (int64_t q = 0; q < n; ++q) d[q] = (d[q] - uh[q] * proj) * inv_denom;
    }
  }
  return du;
}

// ---------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------

void check_args(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b, at::IntArrayRef abs) {
  TORCH_CHECK(x.device().is_cpu() && u.device().is_cpu() && b.device().is_cpu(),
              "householder_chain (CPU kernel): all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "householder_chain: x must be a contiguous (B, n, C) tensor");
  TORCH_CHECK(u.dim() == 3 && at::isFloatingType(u.scalar_type()),
              "householder_chain: u must be a floating-point (L, k, n) tensor");
  const int64_t L = u.size(0), n = u.size(2);
  TORCH_CHECK(n == x.size(1), "householder_chain: x has ", x.size(1), " features but u has ", n);
  TORCH_CHECK(b.numel() == 0 || (b.dim() == 2 && b.size(0) == L && b.size(1) == n),
              "householder_chain: b must be an (L, n) tensor, or empty for no bias");
  TORCH_CHECK(static_cast<int64_t>(abs.size()) == L, "householder_chain: one abs flag per layer");
}

// The kernels' view of the chain: parameters in acc_t (storage kept alive by the caller).
template <typename acc_t>
struct ChainStorage {
  std::vector<acc_t> u, t, b, tt, ut;
  Chain<acc_t> chain;
  ChainStorage(const Prepared& P, const at::Tensor& bias, at::IntArrayRef abs)
      : u(P.uhat.begin(), P.uhat.end()), t(P.t.begin(), P.t.end()), b(P.L * P.n, acc_t(0)), tt(t.size()) {
    if (bias.numel() > 0) {
      const std::vector<double> bd = to_doubles(bias);
      std::copy(bd.begin(), bd.end(), b.begin());
    }
    const int64_t L = P.L, k = P.k, n = P.n;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) tt[(l * k + j) * k + i] = t[(l * k + i) * k + j];
    chain = Chain<acc_t>{L, k, n, u.data(), t.data(), b.data(), std::vector<char>(abs.begin(), abs.end()), tt.data()};
    if (k >= kTransposedMinDirections) {  // U transposed for project_dots_transposed
      constexpr int64_t V = lanes(sizeof(acc_t));
      const int64_t kp = (k + V - 1) / V * V;
      ut.assign(L * n * kp, acc_t(0));
      for (int64_t l = 0; l < L; ++l)
        for (int64_t j = 0; j < k; ++j)
          for (int64_t i = 0; i < n; ++i) ut[(l * n + i) * kp + j] = u[(l * k + j) * n + i];
      chain.ut = ut.data();
      chain.kp = kp;
    }
  }
};

at::Tensor chain_forward(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b, at::IntArrayRef abs,
                         bool normalize) {
  check_args(x, u, b, abs);
  const Prepared P = prepare(u, normalize);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t B = x.size(0), C = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "householder_chain_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChainStorage<acc_t> store(P, b, abs);
    if (C == 1) {
      rows_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, store.chain);
    } else {
      cols_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, C, store.chain);
    }
  });
  return y;
}

// One layer with k > 1 on rows (C = 1), keeping for the backward what it would otherwise recompute:
// returns [y, p, sign]: p = U x of every row, (B, k) in the accumulation dtype, and sign(z) as int8,
// (B, n) (empty for a layer without abs). See "Saved projections and signs".
std::vector<at::Tensor> layer_forward_saving(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b,
                                             at::IntArrayRef abs, bool normalize) {
  check_args(x, u, b, abs);
  const int64_t B = x.size(0), C = x.size(2), L = u.size(0), k = u.size(1), n = u.size(2);
  TORCH_CHECK(L == 1 && k > 1 && C == 1, "householder_layer_forward_saving: one layer, k > 1, on rows (C = 1)");
  const Prepared P = prepare(u, normalize);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor p = at::empty({B, k}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  at::Tensor sign = at::empty({abs[0] ? B : 0, n}, x.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "householder_layer_forward_saving", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChainStorage<acc_t> store(P, b, abs);
    rows_forward_grouped<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B,
                                          store.chain, p.mutable_data_ptr<acc_t>(),
                                          abs[0] ? sign.mutable_data_ptr<int8_t>() : nullptr);
  });
  return {y, p, sign};
}

// Returns [dx, du, db]: dx in x's dtype (empty unless need_input), du in u's dtype and db in b's
// dtype (empty unless need_params; db also when there is no bias). saved_p and saved_sign are
// layer_forward_saving's p and sign, or empty tensors (then the backward recomputes them).
std::vector<at::Tensor> chain_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& u,
                                       const at::Tensor& b, at::IntArrayRef abs, bool normalize, bool need_input,
                                       bool need_params, const at::Tensor& saved_p, const at::Tensor& saved_sign) {
  check_args(x, u, b, abs);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(),
              "householder_chain: grad must be contiguous and match x");
  const Prepared P = prepare(u, normalize);
  const int64_t B = x.size(0), C = x.size(2), L = P.L, k = P.k, n = P.n;
  const bool saved = saved_p.numel() > 0;
  if (saved) {
    TORCH_CHECK(L == 1 && k > 1 && C == 1, "householder_chain_backward: saved projections need one layer, k > 1, C = 1");
    TORCH_CHECK(saved_p.sizes() == at::IntArrayRef({B, k}) && saved_p.is_contiguous() &&
                    saved_p.scalar_type() == at::toOpMathType(x.scalar_type()),
                "householder_chain_backward: saved_p must be the forward's contiguous (B, k) projections");
    TORCH_CHECK(abs[0] ? (saved_sign.sizes() == at::IntArrayRef({B, n}) && saved_sign.scalar_type() == at::kChar &&
                          saved_sign.is_contiguous())
                       : saved_sign.numel() == 0,
                "householder_chain_backward: saved_sign must be the forward's (B, n) int8 signs (empty without abs)");
  }
  at::Tensor dx = need_input ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor du = at::empty({0}, u.options()), db = at::empty({0}, b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "householder_chain_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChainStorage<acc_t> store(P, b, abs);
    std::vector<acc_t> duhat(need_params ? L * k * n : 0), dt(need_params ? L * k * k : 0), dbias(need_params ? L * n : 0);
    scalar_t* dx_ptr = need_input ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    if (C == 1) {
      rows_backward<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx_ptr, B,
                                     store.chain, need_params, duhat.data(), dt.data(), dbias.data(),
                                     saved ? saved_p.const_data_ptr<acc_t>() : nullptr,
                                     saved && abs[0] ? saved_sign.const_data_ptr<int8_t>() : nullptr);
    } else {
      cols_backward<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx_ptr, B, C,
                                     store.chain, need_params, duhat.data(), dt.data(), dbias.data());
    }
    if (need_params) {
      du = from_doubles(parameter_backward(P, duhat.data(), dt.data()), {L, k, n}, u.options());
      if (b.numel() > 0) db = from_doubles(std::vector<double>(dbias.begin(), dbias.end()), {L, n}, b.options());
    }
  });
  return {dx, du, db};
}

// ---------------------------------------------------------------------------------------------
// Autograd
// ---------------------------------------------------------------------------------------------

// The operators, called through the dispatcher below autograd: a Python __torch_dispatch__ mode
// (torch.utils.flop_counter.FlopCounterMode, whose FLOP formulas han_surgery.kernels.flops registers)
// sees each call, which a direct C++ call would hide from it. Without such a mode this goes straight to
// the CPU kernel (a dispatcher lookup, no Python).
at::Tensor call_forward(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b, at::IntArrayRef abs,
                        bool normalize) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("han_surgery::householder_chain_forward", "")
                             .typed<decltype(chain_forward)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, u, b, abs, normalize);
}

std::vector<at::Tensor> call_forward_saving(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b,
                                            at::IntArrayRef abs, bool normalize) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("han_surgery::householder_layer_forward_saving", "")
                             .typed<decltype(layer_forward_saving)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, u, b, abs, normalize);
}

// The forward operator's autograd: its backward is the backward operator, called from C++ (no
// Python per call; a Python autograd.Function cost 40-60 us per training step, 19 layers at
// n = 200 and 100 rows): below autograd as above, except under create_graph=True, where it goes
// through autograd so that its own autograd formula (registered from Python by
// han_surgery.functional: differentiating the chain's definition) records the graph for double
// backward. Saves x, u and b; a single layer with k > 1 on rows also its projections and signs.
class ChainFunction : public torch::autograd::Function<ChainFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& u,
                            const at::Tensor& b, at::IntArrayRef abs, bool normalize) {
    ctx->saved_data["abs"] = abs.vec();
    ctx->saved_data["normalize"] = normalize;
    if (u.size(0) == 1 && u.size(1) > 1 && x.size(2) == 1) {
      std::vector<at::Tensor> out = call_forward_saving(x, u, b, abs, normalize);
      ctx->save_for_backward({x, u, b, out[1], out[2]});
      return out[0];
    }
    ctx->save_for_backward({x, u, b});
    return call_forward(x, u, b, abs, normalize);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &u = saved[1], &b = saved[2];
    const std::vector<int64_t> abs = ctx->saved_data["abs"].toIntVector();
    const bool normalize = ctx->saved_data["normalize"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_u = ctx->needs_input_grad(1), need_b = ctx->needs_input_grad(2);
    const at::Tensor grad = grads[0].contiguous();
    const at::Tensor none = at::empty({0}, x.options());
    const at::Tensor& p = saved.size() > 3 ? saved[3] : none;
    const at::Tensor& sign = saved.size() > 3 ? saved[4] : none;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("han_surgery::householder_chain_backward", "")
                               .typed<decltype(chain_backward)>();
    std::vector<at::Tensor> d;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      d = op.call(grad, x, u, b, abs, normalize, need_x, need_u || need_b, p, sign);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      d = op.call(grad, x, u, b, abs, normalize, need_x, need_u || need_b, p, sign);
    }
    const at::Tensor undefined;
    return {need_x ? d[0] : undefined, need_u ? d[1] : undefined, need_b ? d[2] : undefined, undefined, undefined};
  }
};

at::Tensor chain_forward_autograd(const at::Tensor& x, const at::Tensor& u, const at::Tensor& b, at::IntArrayRef abs,
                                  bool normalize) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || u.requires_grad() || b.requires_grad())) {
    return call_forward(x, u, b, abs, normalize);  // nothing to differentiate: nothing saved
  }
  return ChainFunction::apply(x, u, b, abs, normalize);
}

}  // namespace
}  // namespace han_surgery

// The operators' schemas are defined from Python (han_surgery.kernels.cpu, at import), so that
// their FLOP formulas can be registered before the first FlopCounterMode is created, whether or
// not this extension has been built yet; this file implements them.
TORCH_LIBRARY_IMPL(han_surgery, CPU, m) {
  m.impl("householder_chain_forward", &han_surgery::chain_forward);
  m.impl("householder_layer_forward_saving", &han_surgery::layer_forward_saving);
  m.impl("householder_chain_backward", &han_surgery::chain_backward);
}

TORCH_LIBRARY_IMPL(han_surgery, Autograd, m) {
  m.impl("householder_chain_forward", &han_surgery::chain_forward_autograd);
}
