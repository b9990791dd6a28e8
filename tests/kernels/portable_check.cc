// The kernel's arithmetic without XLA, for builds this machine cannot load into jaxlib: the generic
// 4-lane build (the code NEON runs) on x86, and an aarch64 build under qemu. Prints one line per
// failure and exits 1; "ok <isa>" and 0 when every product equals a float64 reference.
#include "../../bridge/kernels/small_batch_matmul.cc"

#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

struct ThreadsPool {  // what the kernel needs of XLA's pool
  int64_t num_threads() const { return 3; }
  template <typename F>
  void Schedule(F&& f) { std::thread(std::forward<F>(f)).detach(); }
};

static std::mt19937 rng(0);
static float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }
static uint16_t bf16_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return uint16_t(u >> 16); }
static double value(float w) { return w; }
static double value(int8_t w) { return w; }
static double value(uint16_t w) { uint32_t u = uint32_t(w) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static float draw(float*) { return normal(); }
static int8_t draw(int8_t*) { return int8_t(std::uniform_int_distribution<int>(-127, 127)(rng)); }
static uint16_t draw(uint16_t*) { return bf16_bits(normal()); }

static int failures = 0;
static void check(const char* what, int64_t a, int64_t b, int64_t c, const std::vector<float>& got,
                  const std::vector<double>& want) {
  double scale = 1e-30, err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::fabs(want[i]));
    err = std::max(err, std::fabs(got[i] - want[i]));
  }
  if (err > 1e-5 * scale) {
    std::printf("%s %lld,%lld,%lld: max error %g of %g\n", what, (long long)a, (long long)b, (long long)c, err, scale);
    ++failures;
  }
}

template <typename W>
void run_product(const char* what, int64_t M, int64_t N, int64_t K) {
  std::vector<float> x(M * K), y(M * N);
  std::vector<W> w(N * K);
  for (auto& v : x) v = normal();
  for (auto& v : w) v = draw(static_cast<W*>(nullptr));
  product(ThreadsPool{}, x.data(), w.data(), y.data(), M, N, K);
  std::vector<double> want(M * N, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) want[m * N + n] += double(x[m * K + k]) * value(w[n * K + k]);
  check(what, M, N, K, y, want);
}

template <typename W>
void mixed(const char* what, int64_t M, int64_t S, int64_t D, int64_t used) {
  std::vector<float> p(M * S, 0.0f), y(M * D);
  std::vector<W> v(S * D);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t s = 0; s < used; ++s) p[m * S + s] = std::fabs(normal());
  for (auto& e : v) e = draw(static_cast<W*>(nullptr));
  mix(ThreadsPool{}, p.data(), v.data(), y.data(), M, S, D, 1);
  std::vector<double> want(M * D, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t s = 0; s < S; ++s) want[m * D + d] += double(p[m * S + s]) * value(v[s * D + d]);
  check(what, M, S, D, y, want);
}

int main() {
  const int64_t shapes[][3] = {{1, 130, 576}, {1, 7, 33}, {2, 130, 576}, {8, 5, 37}, {9, 64, 16}, {16, 1, 100}, {3, 67, 1}, {8, 33, 1536}};
  for (auto& s : shapes) {
    run_product<float>("f32", s[0], s[1], s[2]);
    run_product<int8_t>("int8", s[0], s[1], s[2]);
    run_product<uint16_t>("bf16", s[0], s[1], s[2]);
  }
  const int64_t mixes[][4] = {{3, 37, 64, 37}, {2, 160, 48, 100}, {16, 5, 80, 3}, {3, 70, 64, 0}};
  for (auto& s : mixes) {
    mixed<float>("mix f32", s[0], s[1], s[2], s[3]);
    mixed<uint16_t>("mix bf16", s[0], s[1], s[2], s[3]);
  }
  if (failures) return 1;
  std::printf("ok %s\n", kernel_isa());
  return 0;
}
