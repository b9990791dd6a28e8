// y[M, N] = x[M, K] @ w[N, K]^T for a few rows (M <= 16: batched decode), w in f32, int8 or bf16.
//
// Why this exists (measured on the 2-core Zen 4 box, 30 x [1536, 576] f32 weights streamed from
// memory): XLA:CPU's 8-row product (a library GEMM) and torch/numpy's all stream the weights at
// 9-12 GB/s, against 25-28 GB/s for a 1-row matrix-vector loop. It is not the arithmetic (the
// same product on weights that stay in L3 runs at ~110-130 GFLOP/s): the loads of the next weight
// rows start too late. This loop reads each weight row once for all M rows of x and prefetches
// weights a few KB ahead into L2 (_MM_HINT_T1), which brings the 8-row product to 24-26 GB/s.
//
// Work is split over XLA's intra-op thread pool in chunks of output columns; the calling thread
// takes chunks too, so it never waits on a task that has not started.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Int32Scalar = ffi::Buffer<ffi::S32, 0>;  // a layer index or a column count; an alias: the handler macros split template commas

namespace {

constexpr int64_t kPrefetchBytes = 8192;  // 2 KB 16.7 GB/s, 4 KB 21-23, 8 KB 23-25; none: half the speed
constexpr int64_t kL2Columns = 64;        // > 8 rows of x: weight rows reused from L2 in 64-row pieces

// 16 weights as f32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const uint16_t* p) {  // bf16 bits: shift into the high half of an f32
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// Lane i of the result = the sum of v[i]'s 16 lanes (16 horizontal sums in 15 adds: a transpose
// tree, instead of 16 separate reductions, ~20% of the 8-row loop's instructions at K = 576;
// measured 4-10% less time for SmolLM2's weights at 8 rows).
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Output columns [n0, n1) for MR rows of x (zero-padded to MR), NR weight rows at a time. x is f32,
// or bf16 (uint16_t bits) with bf16 weights: then AVX512-BF16's dot product of pairs does two
// multiply-adds per lane per instruction with no conversion (bf16 products are exact in f32, sums
// in f32). The target attribute only makes those instructions available; the f32 instantiations
// use none, and the bf16 one runs only where the CPU has them (``bf16_pairs``).
template <typename X, typename W, int MR, int NR>
__attribute__((target("avx512bf16"))) void columns(const X* x, const W* w, float* y, int64_t M, int64_t N,
                                                   int64_t K, int64_t n0, int64_t n1) {
  // x holds MR rows here (zero-padded); only the first M are written to y.
  constexpr bool kPairs = std::is_same_v<X, uint16_t>;
  static_assert(!kPairs || std::is_same_v<W, uint16_t>, "bf16 x goes with bf16 weights");
  constexpr int64_t kStep = kPairs ? 32 : 16;  // 64 bytes of x per step
  const int64_t kfull = K / kStep * kStep;
  const uint64_t tail = (uint64_t{1} << (K - kfull)) - 1;
  const int64_t pf = kPrefetchBytes / static_cast<int64_t>(sizeof(W));
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
    const W* wr = w + n * K;
    for (int64_t k = 0; k < kfull; k += kStep) {
      if ((k * static_cast<int64_t>(sizeof(W))) % 64 == 0)
        for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr + r * K + k + pf), _MM_HINT_T1);
      if constexpr (kPairs) {
        __m512bh v[NR];
        for (int r = 0; r < NR; ++r) v[r] = (__m512bh)_mm512_loadu_si512(wr + r * K + k);
        for (int m = 0; m < MR; ++m) {
          __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
          for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], v[r], xv);
        }
      } else {
        __m512 v[NR];
        for (int r = 0; r < NR; ++r) v[r] = load16(wr + r * K + k);
        for (int m = 0; m < MR; ++m) {
          __m512 xv = _mm512_loadu_ps(x + m * K + k);
          for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(v[r], xv, acc[r][m]);
        }
      }
    }
    if (tail) {
      if constexpr (kPairs) {
        const __mmask32 t = static_cast<__mmask32>(tail);
        __m512bh v[NR];
        for (int r = 0; r < NR; ++r) v[r] = (__m512bh)_mm512_maskz_loadu_epi16(t, wr + r * K + kfull);
        for (int m = 0; m < MR; ++m) {
          __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(t, x + m * K + kfull);
          for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], v[r], xv);
        }
      } else {
        const __mmask16 t = static_cast<__mmask16>(tail);
        __m512 v[NR];
        for (int r = 0; r < NR; ++r) v[r] = load16(wr + r * K + kfull, t);
        for (int m = 0; m < MR; ++m) {
          __m512 xv = _mm512_maskz_loadu_ps(t, x + m * K + kfull);
          for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(v[r], xv, acc[r][m]);
        }
      }
    }
    if constexpr (NR * MR == 16) {
      alignas(64) float sums[16];  // sums[r * MR + m]
      _mm512_store_ps(sums, sum16(&acc[0][0]));
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < NR; ++r) y[m * N + n + r] = sums[r * MR + m];
    } else {
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < NR; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
    }
  }
  if (n < n1) columns<X, W, MR, 1>(x, w, y, M, N, K, n, n1);  // the last NR-1 columns at most
}

// fn(0..tasks-1) on the calling thread and XLA's pool. Tasks are taken from a shared counter, so
// the caller never waits on a task that has not started (the pool may be busy with other ops).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, F fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [=](Shared* s) {
    for (int64_t c; (c = s->next.fetch_add(1)) < tasks;) {
      fn(c);
      s->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, work] { work(shared.get()); });
  work(shared.get());
  while (shared->done.load(std::memory_order_acquire) < tasks) _mm_pause();
}

// y[b] = x[b] @ w[b]^T for `batches` independent products (x [M, K], w [N, K], y [M, N] each); only
// the first `n_used` columns of y are computed (the rest are left as they are).
template <typename X, typename W, int MR, int NR>
void run(ffi::ThreadPool pool, const X* x, const W* w, float* y, int64_t M, int64_t N, int64_t K,
         int64_t batches = 1, int64_t n_used = -1) {
  if (n_used < 0) n_used = N;
  // x zero-padded to a multiple of MR rows, so the inner loop has a fixed trip count.
  const int64_t blocks = (M + MR - 1) / MR;
  auto xs = std::make_unique<X[]>(batches * blocks * MR * K);
  std::memset(xs.get(), 0, sizeof(X) * batches * blocks * MR * K);
  for (int64_t b = 0; b < batches; ++b) std::memcpy(xs.get() + b * blocks * MR * K, x + b * M * K, sizeof(X) * M * K);
  const X* xp = xs.get();
  // One contiguous range of output columns per pool thread: longer runs through the weights stream
  // faster (30 x [1536, 576] at 8 rows: 22.5-23.9 GB/s in halves, 17.5-22.0 in 64-row chunks).
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(2, ((n_used + workers - 1) / workers + 1) / 2 * 2);
  const int64_t chunks = (n_used + chunk - 1) / chunk;
  if (chunks == 0) return;
  parallel_for(pool, batches * chunks, [=](int64_t task) {
    const int64_t b = task / chunks, c = task % chunks, end = std::min(n_used, (c + 1) * chunk);
    // Rows of x beyond MR in further passes over 64 columns at a time, whose weights are then in L2.
    for (int64_t n0 = c * chunk; n0 < end; n0 += kL2Columns)
      for (int64_t blk = 0; blk < blocks; ++blk)
        columns<X, W, MR, NR>(xp + (b * blocks + blk) * MR * K, w + b * N * K, y + b * M * N + blk * MR * N,
                           std::min<int64_t>(MR, M - blk * MR), N, K, n0, std::min(end, n0 + kL2Columns));
  });
}

// y[b] = p[b] @ v[b] (p [M, S], v [S, D], y [M, D]): each row of v read once for all M rows of p,
// 4 rows of p x 64 columns of v in registers. Rows of v past the last column where some row of p is
// nonzero are not read: in decode those are the cache's not yet written columns, whose
// probabilities are exactly 0 after the softmax (exact for any p).
template <typename W>
void mix(ffi::ThreadPool pool, const float* p, const W* v, float* y, int64_t M, int64_t S, int64_t D,
         int64_t batches) {
  const int64_t mblocks = (M + 3) / 4, dblocks = (D + 63) / 64;
  parallel_for(pool, batches, [=](int64_t b) {
    const float* pb = p + b * M * S;
    const W* vb = v + b * S * D;
    float* yb = y + b * M * D;
    int64_t used = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t t = S - 1; t >= used; --t)
        if (pb[m * S + t] != 0.0f) {
          used = t + 1;
          break;
        }
    for (int64_t mb = 0; mb < mblocks; ++mb)
      for (int64_t db = 0; db < dblocks; ++db) {
        const int64_t m0 = mb * 4, rows = std::min<int64_t>(4, M - m0), d0 = db * 64;
        __mmask16 mask[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, D - d0 - 16 * j));
          mask[j] = static_cast<__mmask16>((1u << left) - 1);
        }
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t t = 0; t < used; ++t) {
          __m512 vv[4];
          for (int j = 0; j < 4; ++j) vv[j] = load16(vb + t * D + d0 + 16 * j, mask[j]);
          for (int i = 0; i < 4; ++i) {
            if (i >= rows) break;
            const __m512 pi = _mm512_set1_ps(pb[(m0 + i) * S + t]);
            for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(pi, vv[j], acc[i][j]);
          }
        }
        for (int i = 0; i < rows; ++i)
          for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(yb + (m0 + i) * D + d0 + 16 * j, mask[j], acc[i][j]);
      }
  });
}

bool bf16_pairs() {  // AVX512-BF16 (Zen 4, Sapphire Rapids and later)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

template <typename W>
ffi::Error dispatch(ffi::ThreadPool pool, ffi::AnyBuffer x, const W* w, ffi::ResultBuffer<ffi::F32> y, int64_t N) {
  auto xd = x.dimensions();
  const int64_t K = xd.back();
  const int64_t M = x.element_count() / K;
  float* yp = y->typed_data();
  // Registers: NR weight rows x MR rows of accumulators stay within the 32 zmm registers.
  if (M > 16) return ffi::Error::InvalidArgument("small_batch_matmul takes at most 16 rows");
  if (x.element_type() == ffi::DataType::F32) {
    run<float, W, 8, 2>(pool, reinterpret_cast<const float*>(x.untyped_data()), w, yp, M, N, K);
    return ffi::Error::Success();
  }
  if constexpr (std::is_same_v<W, uint16_t>) {
    if (x.element_type() == ffi::DataType::BF16 && bf16_pairs()) {
      run<uint16_t, uint16_t, 8, 2>(pool, reinterpret_cast<const uint16_t*>(x.untyped_data()), w, yp, M, N, K);
      return ffi::Error::Success();
    }
  }
  return ffi::Error::InvalidArgument("small_batch_matmul: x must be f32, or bf16 with bf16 weights on AVX512-BF16");
}

// fn(the buffer's data from element `offset`, typed) for the element types the kernels read.
template <typename F>
ffi::Error typed(ffi::AnyBuffer b, int64_t offset, const char* what, F fn) {
  switch (b.element_type()) {
    case ffi::DataType::F32: return fn(reinterpret_cast<const float*>(b.untyped_data()) + offset);
    case ffi::DataType::S8: return fn(reinterpret_cast<const int8_t*>(b.untyped_data()) + offset);
    case ffi::DataType::BF16: return fn(reinterpret_cast<const uint16_t*>(b.untyped_data()) + offset);
    default: return ffi::Error::InvalidArgument(what);
  }
}

// The product with weight rows starting at element `offset` of `w` (a layer of a stacked tensor).
ffi::Error multiply(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, int64_t N, int64_t offset,
                    ffi::ResultBuffer<ffi::F32> y) {
  return typed(w, offset, "small_batch_matmul: weight must be f32, s8 or bf16",
               [&](const auto* wp) { return dispatch(pool, x, wp, y, N); });
}

// x [..., K] @ w[N, K]^T
ffi::Error SmallBatchMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] != x.dimensions().back())
    return ffi::Error::InvalidArgument("small_batch_matmul: weight must be [N, K] with K = x's last dim");
  return multiply(pool, x, w, wd[0], 0, y);
}

// x [..., K] @ w[layer, N, K]^T: a scanned layer's weights read in place from the stacked tensor
// (a dynamic slice handed to a custom call is a copy of the layer's weights on every step).
ffi::Error SmallBatchMatmulStacked(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                                   Int32Scalar layer, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 3 || wd[2] != x.dimensions().back())
    return ffi::Error::InvalidArgument("small_batch_matmul_stacked: weight must be [L, N, K] with K = x's last dim");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("small_batch_matmul_stacked: layer out of range");
  return multiply(pool, x, w, wd[1], l * wd[1] * wd[2], y);
}

// The batch of a stacked operand: [L, *batch, rows, cols] at `layer`, or [*batch, rows, cols].
struct Slab {
  int64_t offset = 0, batches = 1, rows = 0, cols = 0;
};
std::optional<Slab> slab(ffi::Span<const int64_t> d, int64_t batch_rank, int64_t layer) {
  Slab out;
  const int64_t r = static_cast<int64_t>(d.size());
  if (r != batch_rank + 2 && r != batch_rank + 3) return std::nullopt;
  const bool stacked = r == batch_rank + 3;
  for (int64_t i = stacked; i < r - 2; ++i) out.batches *= d[i];
  out.rows = d[r - 2];
  out.cols = d[r - 1];
  if (stacked) {
    if (layer < 0 || layer >= d[0]) return std::nullopt;
    out.offset = layer * out.batches * out.rows * out.cols;
  }
  return out;
}

// Attention scores over a cache (f32 or bf16): q [*B, M, D] . keys [(L,) *B, S, D] -> [*B, M, S].
// Columns at or past `visible` are masked by the caller (the cache's not yet written columns): they
// are not read, and set to 0.
ffi::Error CacheScores(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys, Int32Scalar layer,
                       Int32Scalar visible, ffi::ResultBuffer<ffi::F32> y) {
  auto qd = q.dimensions();
  const int64_t batch_rank = static_cast<int64_t>(qd.size()) - 2;
  auto k = slab(keys.dimensions(), batch_rank, *layer.typed_data());
  const int64_t M = qd[qd.size() - 2], D = qd.back();
  if (!k || k->cols != D || k->batches * M * D != q.element_count() || M > 16)
    return ffi::Error::InvalidArgument("cache_scores: q [*B, M<=16, D] and keys [(L,) *B, S, D]");
  return typed(keys, k->offset, "cache_scores: keys must be f32, s8 or bf16", [&](const auto* kp) {
    using W = std::remove_cv_t<std::remove_pointer_t<decltype(kp)>>;
    const int64_t S = k->rows, used = std::clamp<int64_t>(*visible.typed_data(), 0, S);
    float* yp = y->typed_data();
    if (used < S)
      for (int64_t r = 0; r < k->batches * M; ++r) std::fill(yp + r * S + used, yp + (r + 1) * S, 0.0f);
    run<float, W, 8, 2>(pool, q.typed_data(), kp, yp, M, S, D, k->batches, used);
    return ffi::Error::Success();
  });
}

// Probabilities times a cache's values (f32 or bf16): p [*B, M, S] . values [(L,) *B, S, D] -> [*B, M, D].
ffi::Error CacheMix(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::AnyBuffer values, Int32Scalar layer,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto pd = p.dimensions();
  const int64_t batch_rank = static_cast<int64_t>(pd.size()) - 2;
  auto v = slab(values.dimensions(), batch_rank, *layer.typed_data());
  const int64_t M = pd[pd.size() - 2], S = pd.back();
  if (!v || v->rows != S || v->batches * M * S != p.element_count())
    return ffi::Error::InvalidArgument("cache_mix: p [*B, M, S] and values [(L,) *B, S, D]");
  return typed(values, v->offset, "cache_mix: values must be f32, s8 or bf16", [&](const auto* vp) {
    mix(pool, p.typed_data(), vp, y->typed_data(), M, S, v->cols, v->batches);
    return ffi::Error::Success();
  });
}

}  // namespace

// (rows, a weight or cache of several dtypes, a layer index) -> f32. Rows: f32, or any (the products,
// which also take bf16 rows).
template <typename Rows>
auto stacked_binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Rows>().template Arg<ffi::AnyBuffer>().template Arg<Int32Scalar>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(small_batch_matmul, SmallBatchMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(small_batch_matmul_stacked, SmallBatchMatmulStacked, stacked_binding<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cache_scores, CacheScores,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Int32Scalar>()
                                  .Arg<Int32Scalar>()  // visible columns
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cache_mix, CacheMix, stacked_binding<ffi::Buffer<ffi::F32>>());
