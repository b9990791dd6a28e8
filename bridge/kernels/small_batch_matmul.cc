// y[M, N] = x[M, K] @ w[N, K]^T for a few rows (M <= 16: batched decode), w in f32, int8 or bf16,
// and decode attention over a KV cache (q . keys, probabilities . values).
//
// Why this exists (measured on the 2-core Zen 4 box, 30 x [1536, 576] f32 weights streamed from
// memory): XLA:CPU's 8-row product (a library GEMM) and torch/numpy's all stream the weights at
// 9-12 GB/s, against 25-28 GB/s for a 1-row matrix-vector loop. It is not the arithmetic (the
// same product on weights that stay in L3 runs at ~110-130 GFLOP/s): the loads of the next weight
// rows start too late. This loop reads each weight row once for all M rows of x and prefetches
// weights a few KB ahead into L2, which brings the 8-row product to 24-26 GB/s.
//
// One source for every CPU: the arithmetic is written with GCC/Clang vector extensions at the
// width of the machine it is built for (-march=native: 64 bytes with AVX-512, 32 with AVX2, 16 with
// NEON or SSE2), so the compiler picks the instructions. bf16 and int8 weights are widened in
// registers (a shift, a sign extension), never copied to f32 in memory. Two things stay
// ISA-specific, behind the compiler's own macros: AVX-512's transpose tree for the 16 horizontal
// sums, and AVX512-BF16's dot products of bf16 pairs.
//
// Work is split in chunks of output columns over helper threads of the kernel's own, which spin a
// moment between products before they sleep (``Helpers``); the calling thread takes chunks too, so it
// never waits on a task that has not started.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>

#if defined(__linux__)
#include <pthread.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Int32Scalar = ffi::Buffer<ffi::S32, 0>;  // a layer index or a column count; an alias: the handler macros split template commas

#ifndef KERNEL_AVX2_ROWS  // register blocks for 16 ymm registers (-D to measure others)
#define KERNEL_AVX2_ROWS 8
#define KERNEL_AVX2_COLS 1
#endif

namespace {

// The vector width this build runs at, and the register blocks that fit its register file
// (32 zmm with AVX-512; 16 ymm with AVX2, 32 q registers with NEON).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kRowBlock = 8, kColBlock = 2;  // 16 accumulators
constexpr int kNarrowRowBlock = kRowBlock, kNarrowColBlock = kColBlock;
constexpr int kMixRows = 4;                  // cache_mix: 4 rows x 4 vectors of values
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRowBlock = KERNEL_AVX2_ROWS, kColBlock = KERNEL_AVX2_COLS;
// Narrow (bf16, int8) weights: 4 rows x 3 weight rows, 12 accumulators + 3 widened weights + x.
// Their products are bound by instructions, not bytes (each weight vector is also widened), and
// 3 weight rows per x load beat 8 rows x 1 (SmolLM2's weights at 8 rows, interleaved rounds:
// bf16 10.7 -> 11.9 GB/s, int8 5.3 -> 6.8; f32 16.3 against 17.3, so f32 keeps 8 x 1; Zen 3, AVX2).
constexpr int kNarrowRowBlock = 4, kNarrowColBlock = 3;
constexpr int kMixRows = 2;
#else
constexpr int kLanes = 4;
constexpr int kRowBlock = 4, kColBlock = 2;
constexpr int kNarrowRowBlock = kRowBlock, kNarrowColBlock = kColBlock;
constexpr int kMixRows = 4;
#endif

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi32 __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));
typedef int8_t vi8 __attribute__((vector_size(kLanes)));
typedef uint16_t vu16 __attribute__((vector_size(kLanes * 2)));

#ifndef KERNEL_PREFETCH
#define KERNEL_PREFETCH 8192
#endif
constexpr int64_t kPrefetchBytes = KERNEL_PREFETCH;  // Zen 4: 2 KB 16.7 GB/s, 4 KB 21-23, 8 KB 23-25; none: half the speed
constexpr int64_t kL2Bytes = 160 << 10;   // > one row block of x: weight rows reused from L2 in pieces this size

// Below this many bytes read, a product or a cache mix runs on the calling thread alone. Batch-1
// decode reads the cache a few KB a layer: handing that to a helper woke it, and its spinning then
// competed with XLA's own threads for the matrix-vector products (SmolLM2 fp32 batch 1: 33.7
// tokens/s against 43.5 with the kernels off; Zen 3, AVX2, 2 cores).
constexpr int64_t kMinParallelBytes = 256 << 10;

inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }  // prefetcht1 on x86

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// kLanes weights as f32 lanes: f32 as they are, int8 sign-extended, bf16 shifted into the high half.
template <typename T>
inline T load_raw(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}
// On x86 the widening is spelled with intrinsics: GCC 12 lowers __builtin_convertvector of an 8- or
// 16-byte vector through general registers, one byte at a time (~35 instructions where one
// vpmovsxbd does it): int8 ran at 1.8 GB/s against f32's 9.4 at 8 rows (Zen 3, AVX2).
inline vf widen(const float* p) { return load_raw<vf>(p); }
inline vf widen(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  return __builtin_convertvector(__builtin_convertvector(load_raw<vi8>(p), vi32), vf);
#endif
}
inline vf widen(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  return (vf)(__builtin_convertvector(load_raw<vu16>(p), vu32) << 16);
#endif
}
// The first n < kLanes elements, the rest zero (tails: at most once per row).
template <typename T>
inline vf widen_part(const T* p, int64_t n) {
  T buf[kLanes] = {};
  std::memcpy(buf, p, sizeof(T) * n);
  return widen(buf);
}
inline void store_part(float* p, vf v, int64_t n) {
  float buf[kLanes];
  std::memcpy(buf, &v, sizeof buf);
  std::memcpy(p, buf, sizeof(float) * n);
}

// The sum of v's lanes by halving (a loop over lanes read them back through memory, where partial
// store forwarding stalled: ~200 cycles a column on Zen 3, half the 8-row product's time).
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}

#if defined(__AVX512F__)
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
#endif

#if defined(__AVX__) && !defined(__AVX512F__)
// Lane i of the result = the sum of v[i]'s 8 lanes: AVX2's transpose tree, 7 instructions for 8 sums.
inline __m256 sum8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// out[i] = the sum of v[i]'s lanes for C accumulators: whole vectors of sums by a transpose tree
// where C fills them (AVX-512: 16, AVX2: 8), else one halving per accumulator.
template <int C>
inline void reduce(const vf* v, float* out) {
#if defined(__AVX512F__)
  if constexpr (C % 16 == 0) {
    for (int i = 0; i < C; i += 16) _mm512_storeu_ps(out + i, sum16(reinterpret_cast<const __m512*>(v + i)));
    return;
  }
#elif defined(__AVX__)
  if constexpr (C % 8 == 0) {
    for (int i = 0; i < C; i += 8) _mm256_storeu_ps(out + i, sum8(reinterpret_cast<const __m256*>(v + i)));
    return;
  }
#endif
  for (int i = 0; i < C; ++i) out[i] = hsum(v[i]);
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Pairs = true;
// bf16 rows times bf16 weights: AVX512-BF16's dot product of pairs does two multiply-adds per lane
// per instruction with no conversion (bf16 products are exact in f32, sums in f32).
inline __m512 dot_pairs(__m512 acc, const uint16_t* w, const uint16_t* x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
}
inline __m512 dot_pairs_part(__m512 acc, const uint16_t* w, const uint16_t* x, int64_t n) {
  const __mmask32 t = static_cast<__mmask32>((uint64_t{1} << n) - 1);
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(t, w), (__m512bh)_mm512_maskz_loadu_epi16(t, x));
}
#else
constexpr bool kBf16Pairs = false;
#endif

// Output columns [n0, n1) for MR rows of x (zero-padded to MR), NR weight rows at a time. x is f32,
// or bf16 (uint16_t bits) with bf16 weights where the build has AVX512-BF16 (``kBf16Pairs``).
template <typename X, typename W, int MR, int NR>
void columns(const X* x, const W* w, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  // x holds MR rows here (zero-padded); only the first M are written to y.
  constexpr bool kPairs = std::is_same_v<X, uint16_t>;
  static_assert(!kPairs || std::is_same_v<W, uint16_t>, "bf16 x goes with bf16 weights");
  constexpr int64_t kStep = kPairs ? 2 * kLanes : kLanes;
  const int64_t kfull = K / kStep * kStep;
  const int64_t pf = kPrefetchBytes / static_cast<int64_t>(sizeof(W));
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(W));  // weights per cache line
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    vf acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = vf{};
    const W* wr = w + n * K;
    for (int64_t k = 0; k < kfull; k += kStep) {
      if (k % kLine < kStep)  // once per cache line of each weight row
        for (int r = 0; r < NR; ++r) prefetch_l2(wr + r * K + k + pf);
      if constexpr (kPairs) {
#if defined(__AVX512BF16__)
        for (int m = 0; m < MR; ++m)
          for (int r = 0; r < NR; ++r)
            acc[r][m] = (vf)dot_pairs((__m512)acc[r][m], reinterpret_cast<const uint16_t*>(wr) + r * K + k, x + m * K + k);
#endif
      } else {
        vf v[NR];
        for (int r = 0; r < NR; ++r) v[r] = widen(wr + r * K + k);
        for (int m = 0; m < MR; ++m) {
          const vf xv = load_raw<vf>(x + m * K + k);
          for (int r = 0; r < NR; ++r) acc[r][m] += v[r] * xv;  // contracted to FMAs (-ffp-contract=fast)
        }
      }
    }
    if (kfull < K) {
      if constexpr (kPairs) {
#if defined(__AVX512BF16__)
        for (int m = 0; m < MR; ++m)
          for (int r = 0; r < NR; ++r)
            acc[r][m] = (vf)dot_pairs_part((__m512)acc[r][m], reinterpret_cast<const uint16_t*>(wr) + r * K + kfull,
                                           x + m * K + kfull, K - kfull);
#endif
      } else {
        // The last K % kLanes in pieces of kLanes (x's and w's tails zero-filled).
        for (int64_t k = kfull; k < K; k += kLanes) {
          const int64_t left = std::min<int64_t>(kLanes, K - k);
          vf v[NR];
          for (int r = 0; r < NR; ++r) v[r] = widen_part(wr + r * K + k, left);
          for (int m = 0; m < MR; ++m) {
            const vf xv = widen_part(x + m * K + k, left);
            for (int r = 0; r < NR; ++r) acc[r][m] += v[r] * xv;
          }
        }
      }
    }
    float sums[NR * MR];  // sums[r * MR + m]
    reduce<NR * MR>(&acc[0][0], sums);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < NR; ++r) y[m * N + n + r] = sums[r * MR + m];
  }
  if constexpr (NR > 1)
    if (n < n1) columns<X, W, MR, 1>(x, w, y, M, N, K, n, n1);  // the last NR-1 columns at most
}

// fn(0..tasks-1) on the calling thread and a pool's helpers (num_threads(): the helpers and the caller). Tasks are taken from a shared counter, so
// the caller never waits on a task that has not started (the pool may be busy with other ops).
template <typename Pool, typename F>
void parallel_for(Pool& pool, int64_t tasks, F fn, int64_t bytes) {
  if (bytes < kMinParallelBytes) {  // too little to split: waking a helper costs more than it saves
    for (int64_t c = 0; c < tasks; ++c) fn(c);
    return;
  }
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
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);  // num_threads counts the caller
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, work] { work(shared.get()); });
  work(shared.get());
  while (shared->done.load(std::memory_order_acquire) < tasks) spin_pause();
}

// The products' helper threads: one per core but the caller's, each spinning up to kSpin after its
// last task before it sleeps on a condition variable. XLA's intra-op pool sleeps between the small
// ops of a decode step, and waking it took longer than half a product: at 8 rows the caller often
// ran both halves alone (SmolLM2's [1536, 576] f32 weights, 30 layers: 10.1 GB/s through XLA's
// pool against 15.5 with helpers that are awake; Zen 3, AVX2, 2 cores).
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* helpers = new Helpers();  // never destroyed: its threads outlive static destructors
    return *helpers;
  }
  // The workers a product is split for: the helpers and the caller.
  int64_t workers() const { return threads_ + 1; }
  void Schedule(std::function<void()> task) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
      wake = sleeping_ > 0;
    }
    queued_.fetch_add(1, std::memory_order_release);
    if (wake) ready_.notify_one();
  }

 private:
  static constexpr std::chrono::microseconds kSpin{2000};  // > the gaps between a step's products
  Helpers() : threads_(std::min<int64_t>(15, std::max<int64_t>(1, std::thread::hardware_concurrency()) - 1)) {
    for (int64_t i = 0; i < threads_; ++i)
      std::thread([this] {
#if defined(__linux__)
        pthread_setname_np(pthread_self(), "tb-kernel-help");  // named in top -H and in profiles
#endif
        loop();
      }).detach();
  }
  void loop() {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      // Spinning yields the core at each turn: XLA's own threads run the small ops between the
      // products, and one that waited for this core behind a spinning helper took a scheduler
      // slice to start (SmolLM2 bf16 batch 8: its conversion fusions took 40-650 us each).
      while (queued_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ++sleeping_;
        ready_.wait(lock, [this] { return !queue_.empty(); });
        --sleeping_;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      queued_.fetch_sub(1, std::memory_order_relaxed);
      task();
    }
  }
  const int64_t threads_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  int64_t sleeping_ = 0;  // under mu_
  std::atomic<int64_t> queued_{0};
};

// What run() and mix() need of a pool (tests/kernels/portable_check.cc passes its own).
struct OwnPool {
  int64_t num_threads() const { return Helpers::get().workers(); }
  template <typename F>
  void Schedule(F&& f) { Helpers::get().Schedule(std::forward<F>(f)); }
};

// y[b] = x[b] @ w[b]^T for `batches` independent products (x [M, K], w [N, K], y [M, N] each); only
// the first `n_used` columns of y are computed (the rest are left as they are).
template <typename X, typename W, int MR, int NR, typename Pool>
void run(Pool pool, const X* x, const W* w, float* y, int64_t M, int64_t N, int64_t K,
         int64_t batches = 1, int64_t n_used = -1) {
  if (n_used < 0) n_used = N;
  // x zero-padded to a multiple of MR rows, so the inner loop has a fixed trip count.
  const int64_t blocks = (M + MR - 1) / MR;
  auto xs = std::make_unique<X[]>(batches * blocks * MR * K);
  std::memset(xs.get(), 0, sizeof(X) * batches * blocks * MR * K);
  for (int64_t b = 0; b < batches; ++b) std::memcpy(xs.get() + b * blocks * MR * K, x + b * M * K, sizeof(X) * M * K);
  const X* xp = xs.get();
  // One contiguous range of output columns per pool thread: longer runs through the weights stream
  // faster (Zen 4, 30 x [1536, 576] at 8 rows: 22.5-23.9 GB/s in halves, 17.5-22.0 in 64-row chunks).
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(2, ((n_used + workers - 1) / workers + 1) / 2 * 2);
  const int64_t chunks = (n_used + chunk - 1) / chunk;
  // Rows of x beyond one block in further passes over a piece of the weights that stays in L2.
  const int64_t piece = blocks == 1 ? chunk : std::max<int64_t>(NR, kL2Bytes / (K * int64_t(sizeof(W))) / NR * NR);
  if (chunks == 0) return;
  const int64_t bytes = batches * n_used * K * int64_t(sizeof(W));
  parallel_for(pool, batches * chunks, [=](int64_t task) {
    const int64_t b = task / chunks, c = task % chunks, end = std::min(n_used, (c + 1) * chunk);
    for (int64_t n0 = c * chunk; n0 < end; n0 += piece)
      for (int64_t blk = 0; blk < blocks; ++blk)
        columns<X, W, MR, NR>(xp + (b * blocks + blk) * MR * K, w + b * N * K, y + b * M * N + blk * MR * N,
                              std::min<int64_t>(MR, M - blk * MR), N, K, n0, std::min(end, n0 + piece));
  }, bytes);
}

// y[b] = p[b] @ v[b] (p [M, S], v [S, D], y [M, D]): each row of v read once for all M rows of p,
// kMixRows rows of p x 4 vectors of v's columns in registers. Rows of v past the last column where
// some row of p is nonzero are not read: in decode those are the cache's not yet written columns,
// whose probabilities are exactly 0 after the softmax (exact for any p).
template <typename W, typename Pool>
void mix(Pool pool, const float* p, const W* v, float* y, int64_t M, int64_t S, int64_t D,
         int64_t batches) {
  constexpr int64_t kCols = 4 * kLanes;
  const int64_t mblocks = (M + kMixRows - 1) / kMixRows, dblocks = (D + kCols - 1) / kCols;
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
        const int64_t m0 = mb * kMixRows, rows = std::min<int64_t>(kMixRows, M - m0), d0 = db * kCols;
        int64_t width[4];  // columns of each vector inside D
        for (int j = 0; j < 4; ++j) width[j] = std::clamp<int64_t>(D - d0 - kLanes * j, 0, kLanes);
        const bool whole = width[3] == kLanes;
        vf acc[kMixRows][4];
        for (int i = 0; i < kMixRows; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = vf{};
        for (int64_t t = 0; t < used; ++t) {
          vf vv[4];
          const W* row = vb + t * D + d0;
          for (int j = 0; j < 4; ++j)
            vv[j] = whole ? widen(row + kLanes * j) : width[j] > 0 ? widen_part(row + kLanes * j, width[j]) : vf{};
          for (int i = 0; i < kMixRows; ++i) {
            if (i >= rows) break;
            const float pi = pb[(m0 + i) * S + t];
            for (int j = 0; j < 4; ++j) acc[i][j] += pi * vv[j];
          }
        }
        for (int i = 0; i < rows; ++i)
          for (int j = 0; j < 4; ++j)
            if (width[j] > 0) store_part(yb + (m0 + i) * D + d0 + kLanes * j, acc[i][j], width[j]);
      }
  }, batches * S * D * int64_t(sizeof(W)));  // at most: the columns past the last written are not read
}

// f32 rows times weights W: one or two rows (batch-1 decode, or 2) take more weight rows at a time
// instead of padding the rows to a block of kRowBlock.
template <typename W, typename Pool>
void product(Pool pool, const float* x, const W* w, float* y, int64_t M, int64_t N, int64_t K) {
  if (M == 1) run<float, W, 1, 4>(pool, x, w, y, M, N, K);
  else if (M == 2) run<float, W, 2, 4>(pool, x, w, y, M, N, K);
  else if constexpr (std::is_same_v<W, float>) run<float, W, kRowBlock, kColBlock>(pool, x, w, y, M, N, K);
  else run<float, W, kNarrowRowBlock, kNarrowColBlock>(pool, x, w, y, M, N, K);
}

template <typename W>
ffi::Error dispatch(ffi::AnyBuffer x, const W* w, ffi::ResultBuffer<ffi::F32> y, int64_t N) {
  auto xd = x.dimensions();
  const int64_t K = xd.back();
  const int64_t M = x.element_count() / K;
  float* yp = y->typed_data();
  if (M > 16) return ffi::Error::InvalidArgument("small_batch_matmul takes at most 16 rows");
  if (x.element_type() == ffi::DataType::F32) {
    product(OwnPool{}, reinterpret_cast<const float*>(x.untyped_data()), w, yp, M, N, K);
    return ffi::Error::Success();
  }
  if (x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("small_batch_matmul: x must be f32 or bf16");
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.untyped_data());
  if constexpr (std::is_same_v<W, uint16_t> && kBf16Pairs) {
    run<uint16_t, uint16_t, kRowBlock, kColBlock>(OwnPool{}, xb, w, yp, M, N, K);
    return ffi::Error::Success();
  }
  // bf16 rows widened here (M x K: a few KB) rather than by XLA: a conversion op before every
  // product cost more than the product's own widening (SmolLM2 bf16 batch 8, AVX2 build: XLA's
  // small fusions between the products took ~5 ms of a 33 ms step; avx512f machine).
  auto xf = std::make_unique<float[]>(M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t bits = uint32_t{xb[i]} << 16;
    std::memcpy(&xf[i], &bits, sizeof bits);
  }
  product(OwnPool{}, xf.get(), w, yp, M, N, K);
  return ffi::Error::Success();
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
ffi::Error multiply(ffi::AnyBuffer x, ffi::AnyBuffer w, int64_t N, int64_t offset,
                    ffi::ResultBuffer<ffi::F32> y) {
  return typed(w, offset, "small_batch_matmul: weight must be f32, s8 or bf16",
               [&](const auto* wp) { return dispatch(x, wp, y, N); });
}

// x [..., K] @ w[N, K]^T
ffi::Error SmallBatchMatmul(ffi::AnyBuffer x, ffi::AnyBuffer w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] != x.dimensions().back())
    return ffi::Error::InvalidArgument("small_batch_matmul: weight must be [N, K] with K = x's last dim");
  return multiply(x, w, wd[0], 0, y);
}

// x [..., K] @ w[layer, N, K]^T: a scanned layer's weights read in place from the stacked tensor
// (a dynamic slice handed to a custom call is a copy of the layer's weights on every step).
ffi::Error SmallBatchMatmulStacked(ffi::AnyBuffer x, ffi::AnyBuffer w,
                                   Int32Scalar layer, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 3 || wd[2] != x.dimensions().back())
    return ffi::Error::InvalidArgument("small_batch_matmul_stacked: weight must be [L, N, K] with K = x's last dim");
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("small_batch_matmul_stacked: layer out of range");
  return multiply(x, w, wd[1], l * wd[1] * wd[2], y);
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
ffi::Error CacheScores(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys, Int32Scalar layer,
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
    run<float, W, kRowBlock, kColBlock>(OwnPool{}, q.typed_data(), kp, yp, M, S, D, k->batches, used);
    return ffi::Error::Success();
  });
}

// Probabilities times a cache's values (f32 or bf16): p [*B, M, S] . values [(L,) *B, S, D] -> [*B, M, D].
ffi::Error CacheMix(ffi::Buffer<ffi::F32> p, ffi::AnyBuffer values, Int32Scalar layer,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto pd = p.dimensions();
  const int64_t batch_rank = static_cast<int64_t>(pd.size()) - 2;
  auto v = slab(values.dimensions(), batch_rank, *layer.typed_data());
  const int64_t M = pd[pd.size() - 2], S = pd.back();
  if (!v || v->rows != S || v->batches * M * S != p.element_count())
    return ffi::Error::InvalidArgument("cache_mix: p [*B, M, S] and values [(L,) *B, S, D]");
  return typed(values, v->offset, "cache_mix: values must be f32, s8 or bf16", [&](const auto* vp) {
    mix(OwnPool{}, p.typed_data(), vp, y->typed_data(), M, S, v->cols, v->batches);
    return ffi::Error::Success();
  });
}

// stacked[layer] (any element type): one layer's bytes copied out of a stacked tensor. XLA:CPU
// has no 16-bit dynamic slice of its own: it converts the whole stacked bf16 tensor to f32 and
// hoists that out of the scan (a scanned SmolLM2 bf16 prefill held 2x its weights as temporaries),
// and slicing the bits as uint16 copies the whole stack once too.
ffi::Error LayerSlice(ffi::AnyBuffer stacked, Int32Scalar layer, ffi::Result<ffi::AnyBuffer> out) {
  auto d = stacked.dimensions();
  const int64_t l = *layer.typed_data();
  if (d.size() == 0 || l < 0 || l >= d[0] || out->element_type() != stacked.element_type() ||
      out->size_bytes() * d[0] != stacked.size_bytes())
    return ffi::Error::InvalidArgument("layer_slice: stacked [L, ...] -> [...] of the same type, 0 <= layer < L");
  const size_t bytes = out->size_bytes();
  std::memcpy(out->untyped_data(), static_cast<const char*>(stacked.untyped_data()) + l * bytes, bytes);
  return ffi::Error::Success();
}

}  // namespace

// What this build is, for cpu_kernels.isa(): the vector ISA the compiler targeted.
extern "C" const char* kernel_isa() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return "AVX-512+BF16";
#elif defined(__AVX512F__)
  return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "AVX2+FMA";
#elif defined(__AVX__)
  return "AVX";
#elif defined(__ARM_NEON)
  return "NEON";
#elif defined(__SSE2__)
  return "SSE2";
#else
  return "generic";
#endif
}
extern "C" int kernel_bf16_pairs() { return kBf16Pairs; }

// (rows, a weight or cache of several dtypes, a layer index) -> f32. Rows: f32, or any (the products,
// which also take bf16 rows).
template <typename Rows>
auto stacked_binding() {
  return ffi::Ffi::Bind().Arg<Rows>().template Arg<ffi::AnyBuffer>().template Arg<Int32Scalar>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(small_batch_matmul, SmallBatchMatmul,
                              ffi::Ffi::Bind()
                                  
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(small_batch_matmul_stacked, SmallBatchMatmulStacked, stacked_binding<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cache_scores, CacheScores,
                              ffi::Ffi::Bind()
                                  
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<Int32Scalar>()
                                  .Arg<Int32Scalar>()  // visible columns
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cache_mix, CacheMix, stacked_binding<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(layer_slice, LayerSlice,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<Int32Scalar>().Ret<ffi::AnyBuffer>());
