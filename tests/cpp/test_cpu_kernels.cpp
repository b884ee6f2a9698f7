// Every lora_ops::cpu entry point against naive double-precision loops: odd shapes, fp32 / fp16 /
// bf16, dropout on and off, both adapter-index forms, -1 and out-of-range adapters, NaN past an
// adapter's rank, packed slices, strided adapter stacks, and the invalid-argument returns.
//
// Inputs are small multiples of 1/64, exact in every dtype, so the oracle sees the very values
// the kernel sees. A result passes when |got - want| <= tol * mag, where mag is the sum of the
// magnitudes of every term of that output and tol covers the dtype's rounding (output and
// saved intermediates) plus fp32 accumulation over the depth.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/dtype.h"
#include "cpu/gemm_operands.h"
#include "cpu/packed_gemm.h"
#include "cpu/phased_work.h"
#include "cpu/vec.h"
#include "lora_ops/dropout_hash.h"
#include "lora_ops/kernels.h"

namespace {

using lora_ops::AdapterStack;
namespace cpu = lora_ops::cpu;

int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what) {
  ++g_failures;
  if (g_failures <= 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) fail(what);
}

void expect_status(lora_status_t got, lora_status_t want, const std::string& what) {
  expect(got == want,
         what + ": status " + std::to_string(got) + ", expected " + std::to_string(want));
}

const char* dtype_name(lora_dtype_t d) {
  return d == LORA_DTYPE_F32 ? "f32" : d == LORA_DTYPE_F16 ? "f16" : "bf16";
}

// Unit roundoff of a dtype's storage.
double unit_roundoff(lora_dtype_t d) {
  return d == LORA_DTYPE_F32   ? std::ldexp(1.0, -24)
         : d == LORA_DTYPE_F16 ? std::ldexp(1.0, -11)
                               : std::ldexp(1.0, -8);
}

// Tolerance relative to the magnitude sum: a few roundings to the dtype plus fp32 accumulation.
double rel_tol(lora_dtype_t d, int64_t depth) {
  return 4.0 * unit_roundoff(d) + static_cast<double>(depth + 8) * std::ldexp(1.0, -23);
}

size_t dtype_size(lora_dtype_t d) { return d == LORA_DTYPE_F32 ? 4 : 2; }

// A dtype-encoded buffer read and written as doubles.
struct Buffer {
  lora_dtype_t dtype = LORA_DTYPE_F32;
  std::vector<unsigned char> bytes;

  Buffer() = default;
  Buffer(lora_dtype_t d, size_t n) : dtype(d), bytes(n * dtype_size(d), 0) {}

  size_t size() const { return bytes.size() / dtype_size(dtype); }
  void* ptr() { return bytes.empty() ? nullptr : bytes.data(); }
  const void* ptr() const { return bytes.empty() ? nullptr : bytes.data(); }

  double get(size_t i) const {
    switch (dtype) {
      case LORA_DTYPE_F32: {
        float f;
        std::memcpy(&f, &bytes[i * 4], 4);
        return f;
      }
      case LORA_DTYPE_F16: {
        cpu::Half h;
        std::memcpy(&h, &bytes[i * 2], 2);
        return cpu::to_float(h);
      }
      default: {
        cpu::BFloat16 b;
        std::memcpy(&b, &bytes[i * 2], 2);
        return cpu::to_float(b);
      }
    }
  }

  void set(size_t i, double v) {
    const float f = static_cast<float>(v);
    switch (dtype) {
      case LORA_DTYPE_F32:
        std::memcpy(&bytes[i * 4], &f, 4);
        break;
      case LORA_DTYPE_F16: {
        const cpu::Half h = cpu::from_float<cpu::Half>(f);
        std::memcpy(&bytes[i * 2], &h, 2);
        break;
      }
      default: {
        const cpu::BFloat16 b = cpu::from_float<cpu::BFloat16>(f);
        std::memcpy(&bytes[i * 2], &b, 2);
      }
    }
  }

  void fill(double v) {
    for (size_t i = 0; i < size(); ++i) set(i, v);
  }
};

std::mt19937 g_rng(1234);

// Multiples of 1/64 in [-1.5, 1.5]: exact in fp32, fp16 and bf16.
double random_value() {
  return static_cast<double>(std::uniform_int_distribution<int>(-96, 96)(g_rng)) / 64.0;
}

Buffer random_buffer(lora_dtype_t d, size_t n) {
  Buffer b(d, n);
  for (size_t i = 0; i < n; ++i) b.set(i, random_value());
  return b;
}

// Values with full mantissas, whose sums round: what shows a change of summation order, which
// random_buffer's exact sums hide.
Buffer random_rounding_buffer(lora_dtype_t d, size_t n) {
  Buffer b(d, n);
  std::uniform_real_distribution<double> value(-1.5, 1.5);
  for (size_t i = 0; i < n; ++i) b.set(i, value(g_rng));
  return b;
}

std::vector<float> random_floats(size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(random_value());
  return v;
}

bool close(double got, double want, double mag, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= tol * mag + 1e-30;
}

// Compares got[i] with want[i] under tol * mag[i]; reports the first few mismatches.
void expect_close(const std::string& what, size_t n, const std::function<double(size_t)>& got,
                  const std::vector<double>& want, const std::vector<double>& mag, double tol) {
  int reported = 0;
  bool ok = true;
  for (size_t i = 0; i < n; ++i) {
    if (!close(got(i), want[i], mag[i], tol)) {
      ok = false;
      if (reported++ < 3) {
        std::fprintf(stderr, "  %s[%zu]: got %.9g want %.9g (mag %.3g, tol %.3g)\n", what.c_str(),
                     i, got(i), want[i], mag[i], tol * mag[i]);
      }
    }
  }
  expect(ok, what);
}

bool keep(const lora_dropout_t& d, int64_t row, int64_t col) {
  return d.threshold == 0 || lora_dropout_keep(d.seed32, d.threshold, static_cast<uint32_t>(row),
                                               static_cast<uint32_t>(col)) != 0;
}

lora_dropout_t make_dropout(double p, uint32_t seed32) {
  lora_dropout_t d{};
  d.seed32 = seed32;
  d.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

const lora_dropout_t kOff = {0u, 0u, 1.0f, nullptr};

// ---- dtype conversions against an independent rounding oracle ---------------------------------

// v rounded to nearest even in a binary format with `digits` significand bits, smallest normal
// exponent emin and largest finite value max_finite (beyond it: inf).
double round_to_format(double v, int digits, int emin, double max_finite) {
  if (std::isnan(v) || v == 0.0 || std::isinf(v)) return v;
  int e;
  std::frexp(std::fabs(v), &e);  // |v| in [2^(e-1), 2^e)
  const int exponent = std::max(e - 1, emin);
  const double ulp = std::ldexp(1.0, exponent - (digits - 1));
  const double r = std::nearbyint(v / ulp) * ulp;
  return std::fabs(r) > max_finite ? std::copysign(INFINITY, v) : r;
}

double half_bits_value(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exp == 0x1f) return mant ? NAN : sign * INFINITY;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}

void test_conversions() {
  const double half_max = 65504.0, bf16_max = std::ldexp(255.0, 120);
  bool decode_ok = true, encode_ok = true;
  std::vector<float> probes;
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = half_bits_value(static_cast<uint16_t>(h));
    const double got = cpu::half_to_float(static_cast<uint16_t>(h));
    if (!(std::isnan(want) ? std::isnan(got)
                           : (got == want && std::signbit(got) == std::signbit(want)))) {
      decode_ok = false;
    }
    // The value itself, and the midpoint to the next value: a tie that must round to even.
    const double next = half_bits_value(static_cast<uint16_t>(h + 1));
    probes.push_back(static_cast<float>(want));
    if (std::isfinite(want) && std::isfinite(next) && (h & 0x7fff) != 0x7bff) {
      probes.push_back(static_cast<float>((want + next) / 2));
    }
  }
  expect(decode_ok, "half_to_float over every fp16 value");
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 400000; ++i) {
    float f;
    const uint32_t u = bits(g_rng);
    std::memcpy(&f, &u, 4);
    probes.push_back(f);
  }
  for (float f : {65504.0f, 65519.99f, 65520.0f, 1e30f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f,
                  6.1035156e-5f, 6.1032e-5f, -0.0f, INFINITY, -INFINITY, NAN}) {
    probes.push_back(f);
  }
  for (float f : probes) {
    const double want_h = round_to_format(f, 11, -14, half_max);
    const double got_h = half_bits_value(cpu::float_to_half(f));
    const double want_b = round_to_format(f, 8, -126, bf16_max);
    const double got_b = cpu::bf16_to_float(cpu::float_to_bf16(f));
    const bool h_ok = std::isnan(want_h)
                          ? std::isnan(got_h)
                          : got_h == want_h && std::signbit(got_h) == std::signbit(f);
    const bool b_ok = std::isnan(want_b)
                          ? std::isnan(got_b)
                          : got_b == want_b && std::signbit(got_b) == std::signbit(f);
    if (!h_ok || !b_ok) {
      if (encode_ok) {
        std::fprintf(stderr, "  convert %.9g: half %.9g (want %.9g), bf16 %.9g (want %.9g)\n", f,
                     got_h, want_h, got_b, want_b);
      }
      encode_ok = false;
    }
  }
  expect(encode_ok, "float_to_half / float_to_bf16 round to nearest even");
}

// The kernels' vector widening (load_vec, one vector at a time, and load_span) against the
// scalar conversions, over every fp16 and bf16 bit pattern, from an odd address and with a
// ragged end.
template <class T>
bool widening_matches_scalar() {
  std::vector<T> src(65536 + 1);
  for (uint32_t h = 0; h < 65536; ++h) src[h + 1].bits = static_cast<uint16_t>(h);
  const int64_t n = 65536 - 3;
  std::vector<float> spans(n), vectors(n);
  cpu::load_span(spans.data(), src.data() + 1, n);
  int64_t j = 0;
  for (; j + cpu::kVecLen <= n; j += cpu::kVecLen) {
    cpu::store_vec(vectors.data() + j, cpu::load_vec(src.data() + 1 + j));
  }
  for (; j < n; ++j) vectors[j] = cpu::to_float(src[j + 1]);
  const auto same = [](float want, float got) {
    return std::isnan(want) ? std::isnan(got) : std::memcmp(&want, &got, sizeof want) == 0;
  };
  for (int64_t e = 0; e < n; ++e) {
    const float want = cpu::to_float(src[e + 1]);
    if (!same(want, spans[e]) || !same(want, vectors[e])) return false;
  }
  return true;
}

void test_vector_widening() {
  expect(widening_matches_scalar<cpu::Half>(), "load_vec and load_span widen fp16 as to_float");
  expect(widening_matches_scalar<cpu::BFloat16>(), "load_vec and load_span widen bf16 as to_float");
}

// ---- builtin_gemm -----------------------------------------------------------------------------

void test_builtin_gemm_case(lora_dtype_t dt, bool b_is_nk, int64_t m, int64_t n, int64_t k,
                            float beta) {
  const int64_t lda = k + 3, ldb = (b_is_nk ? k : n) + 2, ldc = n + 5;
  const Buffer a = random_buffer(dt, static_cast<size_t>(m * lda));
  const Buffer b = random_buffer(dt, static_cast<size_t>((b_is_nk ? n : k) * ldb));
  Buffer c = random_buffer(dt, static_cast<size_t>(m * ldc));
  if (beta == 0.0f) c.fill(NAN);  // beta == 0 must not read C
  std::vector<double> want(m * n), mag(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, sa = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double bv = b_is_nk ? b.get(j * ldb + p) : b.get(p * ldb + j);
        s += a.get(i * lda + p) * bv;
        sa += std::fabs(a.get(i * lda + p) * bv);
      }
      const double c0 = beta == 0.0f ? 0.0 : c.get(i * ldc + j);
      want[i * n + j] = s + beta * c0;
      mag[i * n + j] = sa + std::fabs(beta * c0);
    }
  }
  const Buffer pad_before = c;
  const cpu::Gemm gemm = cpu::builtin_gemm();
  gemm.fn(gemm.ctx, dt, b_is_nk, m, n, k, a.ptr(), lda, b.ptr(), ldb, beta, c.ptr(), ldc);
  const std::string name = std::string("builtin_gemm ") + dtype_name(dt) +
                           (b_is_nk ? " nk " : " kn ") + std::to_string(m) + "x" +
                           std::to_string(n) + "x" + std::to_string(k) +
                           " beta=" + std::to_string(beta);
  expect_close(
      name, static_cast<size_t>(m * n), [&](size_t e) { return c.get((e / n) * ldc + e % n); },
      want, mag, rel_tol(dt, k));
  bool pad_ok = true;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = n; j < ldc; ++j) {
      const double before = pad_before.get(i * ldc + j), after = c.get(i * ldc + j);
      pad_ok &= (std::isnan(before) && std::isnan(after)) || before == after;
    }
  }
  expect(pad_ok, name + ": columns past n untouched");
}

// builtin_gemm_preferred: the measured row limits, by dtype, by the vector units the kernels
// were built for, and by what ATen's matmul runs on.
void test_builtin_gemm_choice() {
  cpu::BlasTraits amd, intel, intel_amx;
  intel.intel_cpu = intel.mkl_on_intel = true;
  intel_amx = intel;
  intel_amx.bf16_amx = true;
  const auto up_to = [](lora_dtype_t dt, bool x_wt, int64_t rows, const cpu::BlasTraits& t) {
    return cpu::builtin_gemm_preferred(dt, x_wt, rows, t) &&
           !cpu::builtin_gemm_preferred(dt, x_wt, rows + 1, t);
  };
#if defined(__AVX512BF16__)
  expect(up_to(LORA_DTYPE_BF16, true, 4, amd), "bf16 x W^T on AMD: the built-in GEMM to 4 rows");
  expect(up_to(LORA_DTYPE_BF16, true, 8, intel),
         "bf16 x W^T on Intel without AMX: the built-in GEMM to 8 rows");
  expect(up_to(LORA_DTYPE_BF16, true, 4, intel_amx),
         "bf16 x W^T on AMX: the built-in GEMM to 4 rows");
  expect(up_to(LORA_DTYPE_BF16, false, 48, amd) && up_to(LORA_DTYPE_BF16, false, 48, intel),
         "bf16 dY W without AMX: the built-in GEMM to 48 rows, AMD or Intel");
#endif
#if defined(__AVX512F__)
  expect(up_to(LORA_DTYPE_F32, true, 128, intel), "fp32 x W^T against MKL on Intel: to 128 rows");
  expect(cpu::builtin_gemm_preferred(LORA_DTYPE_F32, true, 1 << 20, amd),
         "fp32 with AVX-512 and no MKL on Intel: the built-in GEMM at any row count");
#endif
}

// plan_tiles where W is read in place (b_rows): the fewest tiles on one thread and two per
// thread on several, each within the C tile at its rows (b_rows_max_tile_n); where a narrow
// product splits its rows, within the packed path's kMaxTileN columns.
void test_b_rows_tile_plan() {
  using cpu::ceil_div;
  using cpu::round_up;
  for (int64_t m = cpu::kSmallM + 1; m <= cpu::kBRowsMaxM; ++m) {
    const int64_t widest = cpu::b_rows_max_tile_n(m);
    expect(widest % cpu::kNR == 0 && widest >= cpu::kMaxTileN &&
               round_up(widest, cpu::kMR) * round_up(m, cpu::kNR) <= cpu::kCTileFloats,
           "b_rows_max_tile_n(" + std::to_string(m) + ") = " + std::to_string(widest) +
               ": whole panels, C^T within the C tile");
  }
  for (const int threads : {1, 2, 3, 8}) {
    for (const int64_t m : {17, 64, 128, 200, 256}) {
      for (const int64_t n : {1, 50, 100, 300, 1000, 1024, 4096, 14336}) {
        const cpu::TileGrid g = cpu::plan_tiles(m, n, threads, false, true);
        const std::string what = "plan_tiles b_rows m=" + std::to_string(m) +
                                 " n=" + std::to_string(n) + " threads=" +
                                 std::to_string(threads);
        const int64_t widest = g.tiles_m == 1 ? cpu::b_rows_max_tile_n(m) : cpu::kMaxTileN;
        expect(g.tiles_m * g.tile_m >= m && (g.tiles_m - 1) * g.tile_m < m &&
                   g.tiles_n * g.tile_n >= n && (g.tiles_n - 1) * g.tile_n < n,
               what + ": the tiles cover the product, none empty");
        expect(g.tile_n <= widest, what + ": tile width " + std::to_string(g.tile_n));
        if (threads == 1) {
          expect(g.tiles_m == 1 && g.tiles_n == ceil_div(n, cpu::b_rows_max_tile_n(m)),
                 what + ": the fewest tiles");
        } else if (n >= 2 * threads * 64) {
          expect(g.tiles_m == 1 && g.tiles_n >= 2 * threads,
                 what + ": two tiles per thread or more, " + std::to_string(g.tiles_n));
        }
      }
    }
  }
  // Two threads: two tiles each where the widest balance (the packed plan: 3 x 2 tiles of at
  // most 256 columns, 8 and 16 here).
  const cpu::TileGrid g1 = cpu::plan_tiles(128, 1024, 2, false, true);
  expect(g1.tiles_m == 1 && g1.tiles_n == 4 && g1.tile_n == 256,
         "plan_tiles b_rows 128 x 1024, two threads: 4 tiles of 256");
  const cpu::TileGrid g2 = cpu::plan_tiles(128, 4096, 2, false, true);
  expect(g2.tiles_m == 1 && g2.tiles_n == 8 && g2.tile_n == 512,
         "plan_tiles b_rows 128 x 4096, two threads: 8 tiles of 512 (768 would not balance)");
}

void test_builtin_gemm() {
  for (lora_dtype_t dt : {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16}) {
    for (bool nk : {true, false}) {
      test_builtin_gemm_case(dt, nk, 1, 1, 1, 0.0f);
      test_builtin_gemm_case(dt, nk, 7, 13, 5, 0.0f);
      test_builtin_gemm_case(dt, nk, 5, 9, 0, 0.0f);   // k = 0: C = 0
      test_builtin_gemm_case(dt, nk, 5, 9, 0, -0.5f);  // k = 0: C = beta C
      test_builtin_gemm_case(dt, nk, 37, 45, 300, 1.0f);
      test_builtin_gemm_case(dt, nk, 3, 600, 70, -0.5f);
      test_builtin_gemm_case(dt, nk, 4, 70, 600, 0.0f);
      // The streamed path's row groups (4 at a time, a ragged last group), depths past one
      // streamed depth block with a ragged end, and the first row count that packs instead.
      test_builtin_gemm_case(dt, nk, 13, 50, 4000, 0.5f);
      test_builtin_gemm_case(dt, nk, 8, 45, 3101, 0.5f);  // the most rows streamed along j
      test_builtin_gemm_case(dt, nk, 16, 33, 3100, 0.0f);
      test_builtin_gemm_case(dt, nk, 17, 40, 70, 1.0f);
      // Streamed depth blocks at their deepest (one and two rows: past 24576 and 12288).
      test_builtin_gemm_case(dt, nk, 1, 5, 24600, 0.0f);
      test_builtin_gemm_case(dt, nk, 2, 7, 12300, 1.0f);
      // Packed panels: depth below, at and past one 8-wide transpose block, row and column
      // counts that leave partial panels of A (kMR) and B (kNR), and a ragged last depth block.
      test_builtin_gemm_case(dt, nk, 20, 21, 5, 0.0f);
      test_builtin_gemm_case(dt, nk, 23, 17, 8, 0.0f);
      test_builtin_gemm_case(dt, nk, 19, 300, 263, 1.0f);
      // fp32 x W^T at 17-256 rows reads W in place (gemm_tile_b_rows), A's rows as vectors of
      // 16: pairs of panels (4 vectors) against half groups of W's rows, then a last group of
      // 1-3 vectors, or 5 for a single one past a pair (BRowsGroups), each against W's rows at
      // its own width, ragged above and below half of it. On two threads plan_tiles splits these
      // rows into tiles (below, one thread: all rows in one tile).
      test_builtin_gemm_case(dt, nk, 40, 100, 300, 0.5f);
      test_builtin_gemm_case(dt, nk, 48, 70, 530, 0.0f);
      test_builtin_gemm_case(dt, nk, 64, 24, 300, 0.5f);
      test_builtin_gemm_case(dt, nk, 80, 29, 530, 0.0f);
      test_builtin_gemm_case(dt, nk, 128, 4, 260, 1.0f);
      // Depth past one of its blocks (2048): single panels; then, on one thread, where a
      // product is one tile of all its rows (plan_tiles splits rows to feed more threads), one
      // pair, and a pair and a last panel (more than kNarrowMaxN columns, or B is streamed).
      test_builtin_gemm_case(dt, nk, 40, 30, 4100, 0.5f);
#ifdef _OPENMP
      const int threads = omp_get_max_threads();
      omp_set_num_threads(1);
#endif
      test_builtin_gemm_case(dt, nk, 64, 70, 2049, 0.5f);
      test_builtin_gemm_case(dt, nk, 96, 65, 2100, 0.0f);
      // The last group of each size: 3 vectors, the last of one row (7 columns: a full group of
      // 6 and a half one); 5 vectors against groups of 4, 4 and a half one of 2, and of 4, 4
      // and 3 (ragged full) past a depth block; a pair and 3 vectors (29 columns; 4, below a
      // pair's full 6 and above a last group's half 3); a pair and 2 vectors at half widths (2
      // columns); a pair and 5 vectors, depth blocks of 1024 (160 rows padded).
      test_builtin_gemm_case(dt, nk, 33, 7, 300, 0.5f);
      test_builtin_gemm_case(dt, nk, 72, 10, 300, 0.0f);
      test_builtin_gemm_case(dt, nk, 70, 11, 2100, 1.0f);
      test_builtin_gemm_case(dt, nk, 112, 29, 530, 0.5f);
      test_builtin_gemm_case(dt, nk, 100, 4, 300, 0.0f);
      test_builtin_gemm_case(dt, nk, 90, 2, 300, 0.5f);
      test_builtin_gemm_case(dt, nk, 144, 26, 1100, 0.0f);
      // 129-256 rows in place: blocks of 1024 (b_rows_depth), two and a ragged third.
      test_builtin_gemm_case(dt, nk, 200, 70, 2100, 0.5f);
      test_builtin_gemm_case(dt, nk, 256, 33, 1030, 0.0f);
      // Tiles wider than kMaxTileN, as wide as their C^T fits (b_rows_max_tile_n): 3072
      // columns at 17 rows, 768 at 128 (700 here), 384 at 256, and two tiles past it.
      test_builtin_gemm_case(dt, nk, 17, 3000, 40, 0.5f);
      test_builtin_gemm_case(dt, nk, 128, 700, 300, 0.0f);
      test_builtin_gemm_case(dt, nk, 256, 384, 130, 1.0f);
      test_builtin_gemm_case(dt, nk, 250, 390, 70, 0.0f);
#ifdef _OPENMP
      omp_set_num_threads(threads);
#endif
    }
  }
  // bf16 pairs (vdpbf16ps where the CPU has it), B along k and along j: several depth blocks
  // ending in an odd one, rows at odd element offsets (ldb odd here, lda in the k = 300 case
  // above), partial panels, two row tiles with several row blocks each.
  for (bool nk : {true, false}) {
    test_builtin_gemm_case(LORA_DTYPE_BF16, nk, 41, 67, 777, 0.5f);
    test_builtin_gemm_case(LORA_DTYPE_BF16, nk, 390, 100, 257, 0.0f);
  }
  test_builtin_gemm_case(LORA_DTYPE_F32, true, 401, 290, 530, 0.0f);
  test_builtin_gemm_case(LORA_DTYPE_F32, false, 401, 290, 530, 0.25f);
  // m == 0 or n == 0 must not touch anything (NULL pointers included).
  const cpu::Gemm gemm = cpu::builtin_gemm();
  gemm.fn(gemm.ctx, LORA_DTYPE_F32, true, 0, 5, 5, nullptr, 5, nullptr, 5, 0.0f, nullptr, 5);
  gemm.fn(gemm.ctx, LORA_DTYPE_F32, true, 5, 0, 5, nullptr, 5, nullptr, 5, 0.0f, nullptr, 0);
}

// ---- single adapter ---------------------------------------------------------------------------

struct LinearCase {
  lora_dtype_t dtype;
  int64_t M, N, K, r;
  double p;
  bool bias;
  int64_t x_pad;  // ldx = K + x_pad
};

std::string case_name(const char* op, const LinearCase& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s %s M=%lld N=%lld K=%lld r=%lld p=%.2f bias=%d ldx=K+%lld", op,
                dtype_name(c.dtype), static_cast<long long>(c.M), static_cast<long long>(c.N),
                static_cast<long long>(c.K), static_cast<long long>(c.r), c.p, c.bias ? 1 : 0,
                static_cast<long long>(c.x_pad));
  return buf;
}

void test_linear_case(const LinearCase& c) {
  const lora_dtype_t dt = c.dtype;
  const int64_t M = c.M, N = c.N, K = c.K, r = c.r, ldx = K + c.x_pad;
  const lora_dropout_t drop =
      c.p > 0 ? make_dropout(c.p, 0x9e3779b9u ^ static_cast<uint32_t>(M)) : kOff;
  const float scaling = 0.75f;
  const Buffer x = random_buffer(dt, static_cast<size_t>(M * ldx));
  const Buffer w = random_buffer(dt, static_cast<size_t>(N * K));
  const Buffer bias = c.bias ? random_buffer(dt, static_cast<size_t>(N)) : Buffer(dt, 0);
  const Buffer a = random_buffer(dt, static_cast<size_t>(r * K));
  const Buffer b = random_buffer(dt, static_cast<size_t>(N * r));
  const Buffer dy = random_buffer(dt, static_cast<size_t>(M * N));

  auto xd = [&](int64_t i, int64_t k) {  // drop(x) in double
    return keep(drop, i, k) ? x.get(i * ldx + k) * static_cast<double>(drop.keep_scale) : 0.0;
  };

  // Forward oracle.
  std::vector<double> s_ref(M * r), s_mag(M * r), y_ref(M * N), y_mag(M * N);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0, sa = 0;
      for (int64_t k = 0; k < K; ++k) {
        s += xd(i, k) * a.get(j * K + k);
        sa += std::fabs(xd(i, k) * a.get(j * K + k));
      }
      s_ref[i * r + j] = s;
      s_mag[i * r + j] = sa;
    }
    for (int64_t n = 0; n < N; ++n) {
      double y = c.bias ? bias.get(n) : 0.0, ya = std::fabs(y);
      for (int64_t k = 0; k < K; ++k) {
        y += x.get(i * ldx + k) * w.get(n * K + k);
        ya += std::fabs(x.get(i * ldx + k) * w.get(n * K + k));
      }
      for (int64_t j = 0; j < r; ++j) {
        y += scaling * s_ref[i * r + j] * b.get(n * r + j);
        ya += std::fabs(scaling * b.get(n * r + j)) * s_mag[i * r + j];
      }
      y_ref[i * N + n] = y;
      y_mag[i * N + n] = ya;
    }
  }
  Buffer s(dt, static_cast<size_t>(M * r)), y(dt, static_cast<size_t>(M * N));
  y.fill(NAN);  // every element must be written
  const lora_status_t st =
      cpu::lora_linear_fwd(dt, M, N, K, r, x.ptr(), ldx, w.ptr(), c.bias ? bias.ptr() : nullptr,
                           a.ptr(), b.ptr(), scaling, drop, s.ptr(), y.ptr(), cpu::builtin_gemm());
  expect_status(st, LORA_OK, case_name("fwd", c));
  expect_close(
      case_name("fwd S", c), s_ref.size(), [&](size_t e) { return s.get(e); }, s_ref, s_mag,
      rel_tol(dt, K));
  expect_close(
      case_name("fwd y", c), y_ref.size(), [&](size_t e) { return y.get(e); }, y_ref, y_mag,
      rel_tol(dt, K + r));

  // Backward oracle; S saved is the kernel's own (what autograd hands back).
  std::vector<double> ds(M * r), ds_mag(M * r);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      double v = 0, va = 0;
      for (int64_t n = 0; n < N; ++n) {
        v += dy.get(i * N + n) * b.get(n * r + j);
        va += std::fabs(dy.get(i * N + n) * b.get(n * r + j));
      }
      ds[i * r + j] = scaling * v;
      ds_mag[i * r + j] = std::fabs(scaling) * va;
    }
  }
  std::vector<double> dx_ref(M * K), dx_mag(M * K), da_ref(r * K), da_mag(r * K), db_ref(N * r),
      db_mag(N * r);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      double v = 0, va = 0;
      for (int64_t n = 0; n < N; ++n) {
        v += dy.get(i * N + n) * w.get(n * K + k);
        va += std::fabs(dy.get(i * N + n) * w.get(n * K + k));
      }
      double adapter = 0, adapter_mag = 0;
      for (int64_t j = 0; j < r; ++j) {
        adapter += ds[i * r + j] * a.get(j * K + k);
        adapter_mag += ds_mag[i * r + j] * std::fabs(a.get(j * K + k));
      }
      const double ks = keep(drop, i, k) ? static_cast<double>(drop.keep_scale) : 0.0;
      dx_ref[i * K + k] = v + ks * adapter;
      dx_mag[i * K + k] = va + ks * adapter_mag;
    }
  }
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < K; ++k) {
      double v = 0, va = 0;
      for (int64_t i = 0; i < M; ++i) {
        v += ds[i * r + j] * xd(i, k);
        va += ds_mag[i * r + j] * std::fabs(xd(i, k));
      }
      da_ref[j * K + k] = v;
      da_mag[j * K + k] = va;
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < r; ++j) {
      double v = 0, va = 0;
      for (int64_t i = 0; i < M; ++i) {
        v += dy.get(i * N + n) * s.get(i * r + j);
        va += std::fabs(dy.get(i * N + n) * s.get(i * r + j));
      }
      db_ref[n * r + j] = scaling * v;
      db_mag[n * r + j] = std::fabs(scaling) * va;
    }
  }
  Buffer dx(dt, static_cast<size_t>(M * K)), da(dt, static_cast<size_t>(r * K)),
      db(dt, static_cast<size_t>(N * r));
  dx.fill(NAN);
  da.fill(NAN);
  db.fill(NAN);
  expect_status(cpu::lora_linear_bwd(dt, M, N, K, r, dy.ptr(), x.ptr(), ldx, w.ptr(), a.ptr(),
                                     b.ptr(), s.ptr(), scaling, drop, dx.ptr(), da.ptr(), db.ptr(),
                                     cpu::builtin_gemm()),
                LORA_OK, case_name("bwd", c));
  expect_close(
      case_name("bwd dx", c), dx_ref.size(), [&](size_t e) { return dx.get(e); }, dx_ref, dx_mag,
      rel_tol(dt, N + r));
  expect_close(
      case_name("bwd d_lora_a", c), da_ref.size(), [&](size_t e) { return da.get(e); }, da_ref,
      da_mag, rel_tol(dt, M + N));
  expect_close(
      case_name("bwd d_lora_b", c), db_ref.size(), [&](size_t e) { return db.get(e); }, db_ref,
      db_mag, rel_tol(dt, M));

  // Each output alone: the others stay NULL and the wanted one is unchanged.
  Buffer da_only(dt, static_cast<size_t>(r * K)), db_only(dt, static_cast<size_t>(N * r));
  expect_status(cpu::lora_linear_bwd(dt, M, N, K, r, dy.ptr(), x.ptr(), ldx, nullptr, nullptr,
                                     b.ptr(), nullptr, scaling, drop, nullptr, da_only.ptr(),
                                     nullptr, cpu::Gemm{nullptr, nullptr}),
                LORA_OK, case_name("bwd d_lora_a only", c));
  expect(da_only.bytes == da.bytes, case_name("bwd d_lora_a only matches", c));
  expect_status(cpu::lora_linear_bwd(dt, M, N, K, r, dy.ptr(), nullptr, ldx, nullptr, nullptr,
                                     nullptr, s.ptr(), scaling, drop, nullptr, nullptr,
                                     db_only.ptr(), cpu::Gemm{nullptr, nullptr}),
                LORA_OK, case_name("bwd d_lora_b only", c));
  expect(db_only.bytes == db.bytes, case_name("bwd d_lora_b only matches", c));
}

void test_linear() {
  for (lora_dtype_t dt : {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16}) {
    for (double p : {0.0, 0.3}) {
      test_linear_case({dt, 1, 1, 1, 1, p, true, 0});
      test_linear_case({dt, 7, 13, 19, 5, p, true, 3});
      test_linear_case({dt, 37, 50, 300, 17, p, false, 0});
      test_linear_case({dt, 3, 70, 90, 257, p, true, 1});
    }
  }
  // Up to 16 rows (or a rank of up to 16 for d_lora_a) B is streamed instead of packed; so is
  // A in the shrink at any number of rows while the rank is narrow (up to 64, the cases with
  // K >= 128 above and the two M = 389 ones here; with AVX-512).
  test_linear_case({LORA_DTYPE_BF16, 4, 300, 600, 9, 0.2, true, 5});
  test_linear_case({LORA_DTYPE_F16, 200, 30, 70, 3, 0.2, true, 0});
  test_linear_case({LORA_DTYPE_F32, 389, 300, 600, 16, 0.1, true, 0});
  test_linear_case({LORA_DTYPE_BF16, 389, 300, 600, 16, 0.1, true, 0});
  // A shrink packed again: a rank above 64, and fp32 full panels (r = 32) beyond 512 rows.
  test_linear_case({LORA_DTYPE_F32, 40, 33, 130, 70, 0.2, true, 1});
  test_linear_case({LORA_DTYPE_F32, 520, 20, 140, 32, 0.0, true, 0});
  // More than 16 rows with a rank of at most 16, without dropout.
  test_linear_case({LORA_DTYPE_F32, 389, 300, 600, 16, 0.0, true, 2});
  test_linear_case({LORA_DTYPE_BF16, 40, 33, 70, 5, 0.0, false, 1});
  test_linear_case({LORA_DTYPE_F16, 17, 17, 45, 1, 0.0, true, 3});
  test_linear_case({LORA_DTYPE_F32, 9, 11, 13, 0, 0.0, true, 0});  // no adapter rank at all
}

// Dropped elements of x never reach S or d_lora_a, even when they are NaN.
void test_dropout_masks_nan() {
  const int64_t M = 23, K = 41, N = 9, r = 4;
  const lora_dropout_t drop = make_dropout(0.5, 77u);
  Buffer x = random_buffer(LORA_DTYPE_F32, M * K);
  int dropped = 0;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      if (!keep(drop, i, k)) {
        x.set(i * K + k, NAN);
        ++dropped;
      }
    }
  }
  expect(dropped > M * K / 4, "dropout p=0.5 drops about half");
  const Buffer a = random_buffer(LORA_DTYPE_F32, r * K), b = random_buffer(LORA_DTYPE_F32, N * r);
  const Buffer w(LORA_DTYPE_F32, N * K), dy = random_buffer(LORA_DTYPE_F32, M * N);
  Buffer s(LORA_DTYPE_F32, M * r), y(LORA_DTYPE_F32, M * N), da(LORA_DTYPE_F32, r * K);
  expect_status(
      cpu::lora_linear_fwd(LORA_DTYPE_F32, M, N, K, r, x.ptr(), K, w.ptr(), nullptr, a.ptr(),
                           b.ptr(), 1.0f, drop, s.ptr(), y.ptr(), cpu::builtin_gemm()),
      LORA_OK, "fwd with NaN in dropped x");
  bool finite = true;
  for (size_t e = 0; e < s.size(); ++e) finite &= std::isfinite(s.get(e));
  expect(finite, "S is finite when every NaN of x is dropped");
  expect_status(cpu::lora_linear_bwd(LORA_DTYPE_F32, M, N, K, r, dy.ptr(), x.ptr(), K, nullptr,
                                     nullptr, b.ptr(), nullptr, 1.0f, drop, nullptr, da.ptr(),
                                     nullptr, cpu::Gemm{nullptr, nullptr}),
                LORA_OK, "bwd with NaN in dropped x");
  finite = true;
  for (size_t e = 0; e < da.size(); ++e) finite &= std::isfinite(da.get(e));
  expect(finite, "d_lora_a is finite when every NaN of x is dropped");
}

// The GEMM operands' dropout where an element is read on its own (dropout_value): A with a
// non-unit depth stride, and B in neither of its streamed layouts (kOther). The ops give x a unit
// column stride, so their tests reach only the span loads; C = drop(A) B and C = A drop(B)
// against the explicit mask, streamed (m <= kSmallM) and packed, on the thread team.
void test_strided_dropout_operands() {
  const lora_dropout_t drop = make_dropout(0.3, 4242u);
  for (const int64_t m : {int64_t{5}, int64_t{40}}) {
    const int64_t n = 37, k = 53;
    // a_t holds A transposed (A(i, p) = a_t[p * m + i]); b_s holds B at strides (3, 3k).
    const Buffer a_t = random_buffer(LORA_DTYPE_F32, m * k);
    const Buffer b_s = random_buffer(LORA_DTYPE_F32, 3 * k * n);
    const Buffer a = random_buffer(LORA_DTYPE_F32, m * k);
    auto a_t_at = [&](int64_t i, int64_t p) { return a_t.get(p * m + i); };
    auto b_at = [&](int64_t p, int64_t j) { return b_s.get(p * 3 + j * 3 * k); };
    for (const bool drop_a : {true, false}) {
      std::vector<double> want(m * n), mag(m * n);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double sum = 0, sum_abs = 0;
          for (int64_t p = 0; p < k; ++p) {
            const double av = drop_a ? (keep(drop, i, p) ? a_t_at(i, p) * drop.keep_scale : 0.0)
                                     : a.get(i * k + p);
            const double bv =
                drop_a ? b_at(p, j) : (keep(drop, p, j) ? b_at(p, j) * drop.keep_scale : 0.0);
            sum += av * bv;
            sum_abs += std::fabs(av * bv);
          }
          want[i * n + j] = sum;
          mag[i * n + j] = sum_abs;
        }
      }
      Buffer c(LORA_DTYPE_F32, m * n);
      c.fill(NAN);
      const lora_dropout_t b_drop = drop_a ? kOff : drop;
      const cpu::OperandB<float> b_op{static_cast<const float*>(b_s.ptr()), 3, 3 * k, b_drop};
      const cpu::StoreScaled<float> store{static_cast<float*>(c.ptr()), n, 1.0f};
      const lora_status_t status =
          drop_a ? cpu::parallel_gemm(cpu::OperandA<float>{static_cast<const float*>(a_t.ptr()),
                                                           1, m, nullptr, drop},
                                      b_op, store, m, n, k)
                 : cpu::parallel_gemm(
                       cpu::OperandA<float>{static_cast<const float*>(a.ptr()), k, 1}, b_op,
                       store, m, n, k);
      const std::string what = std::string(drop_a ? "drop(A) B, A strided" : "A drop(B), B kOther") +
                               " m=" + std::to_string(m);
      expect_status(status, LORA_OK, what);
      expect_close(
          what, static_cast<size_t>(m * n), [&](size_t e) { return c.get(e); }, want, mag,
          rel_tol(LORA_DTYPE_F32, k));
    }
  }
}

// M = 0: nothing read, forward writes nothing, the weight gradients are zero.
void test_linear_empty() {
  const int64_t N = 6, K = 5, r = 3;
  Buffer a = random_buffer(LORA_DTYPE_BF16, r * K), b = random_buffer(LORA_DTYPE_BF16, N * r);
  Buffer w = random_buffer(LORA_DTYPE_BF16, N * K);
  expect_status(
      cpu::lora_linear_fwd(LORA_DTYPE_BF16, 0, N, K, r, nullptr, K, w.ptr(), nullptr, a.ptr(),
                           b.ptr(), 1.0f, kOff, nullptr, nullptr, cpu::builtin_gemm()),
      LORA_OK, "fwd M=0");
  Buffer da(LORA_DTYPE_BF16, r * K), db(LORA_DTYPE_BF16, N * r);
  da.fill(NAN);
  db.fill(NAN);
  expect_status(cpu::lora_linear_bwd(LORA_DTYPE_BF16, 0, N, K, r, nullptr, nullptr, K, w.ptr(),
                                     a.ptr(), b.ptr(), nullptr, 1.0f, kOff, nullptr, da.ptr(),
                                     db.ptr(), cpu::builtin_gemm()),
                LORA_OK, "bwd M=0");
  bool zeros = true;
  for (size_t e = 0; e < da.size(); ++e) zeros &= da.get(e) == 0.0;
  for (size_t e = 0; e < db.size(); ++e) zeros &= db.get(e) == 0.0;
  expect(zeros, "bwd M=0 gives zero d_lora_a and d_lora_b");
}

// Same bits whatever the thread count: each output has one owner and a fixed summation order,
// whichever way the threads split the columns. Packed (M = 300) and streamed (M = 13, the
// weight read in place; odd widths, so that vector loops end in tails) products.
void check_thread_count_invariance(lora_dtype_t d, int64_t M, int64_t N, int64_t K, int64_t r) {
#ifdef _OPENMP
  const std::string what = std::string(dtype_name(d)) + " M=" + std::to_string(M);
  const lora_dropout_t drop = make_dropout(0.2, 5u);
  const Buffer x = random_rounding_buffer(d, M * K), w = random_rounding_buffer(d, N * K);
  const Buffer a = random_rounding_buffer(d, r * K), b = random_rounding_buffer(d, N * r);
  Buffer s1(d, M * r), y1(d, M * N);
  Buffer s2(d, M * r), y2(d, M * N);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  cpu::lora_linear_fwd(d, M, N, K, r, x.ptr(), K, w.ptr(), nullptr, a.ptr(), b.ptr(), 0.5f, drop,
                       s1.ptr(), y1.ptr(), cpu::builtin_gemm());
  omp_set_num_threads(threads > 1 ? threads : 2);
  cpu::lora_linear_fwd(d, M, N, K, r, x.ptr(), K, w.ptr(), nullptr, a.ptr(), b.ptr(), 0.5f, drop,
                       s2.ptr(), y2.ptr(), cpu::builtin_gemm());
  const Buffer dy = random_buffer(d, M * N);
  Buffer dx1(d, M * K), da1(d, r * K), db1(d, N * r);
  Buffer dx2(d, M * K), da2(d, r * K), db2(d, N * r);
  cpu::lora_linear_bwd(d, M, N, K, r, dy.ptr(), x.ptr(), K, w.ptr(), a.ptr(), b.ptr(), s2.ptr(),
                       0.5f, drop, dx2.ptr(), da2.ptr(), db2.ptr(), cpu::builtin_gemm());
  omp_set_num_threads(1);
  cpu::lora_linear_bwd(d, M, N, K, r, dy.ptr(), x.ptr(), K, w.ptr(), a.ptr(), b.ptr(), s2.ptr(),
                       0.5f, drop, dx1.ptr(), da1.ptr(), db1.ptr(), cpu::builtin_gemm());
  omp_set_num_threads(threads);
  expect(s1.bytes == s2.bytes && y1.bytes == y2.bytes,
         "fwd bitwise equal on 1 and 2+ threads, " + what);
  expect(dx1.bytes == dx2.bytes && da1.bytes == da2.bytes && db1.bytes == db2.bytes,
         "bwd bitwise equal on 1 and 2+ threads, " + what);
#endif
}

void test_thread_count_invariance() {
  check_thread_count_invariance(LORA_DTYPE_BF16, 300, 270, 520, 24);
  check_thread_count_invariance(LORA_DTYPE_F32, 13, 1000, 1111, 16);
  check_thread_count_invariance(LORA_DTYPE_F16, 13, 1000, 1111, 16);
  // fp32 x W^T at 300 rows: one tile of 300 on one thread (packed B), tiles of 108 on
  // two (W read in place, gemm_tile_b_rows): the two paths must round alike. And 64 rows, W in
  // place on any thread count, depth past one of its blocks; 144 rows, W in place as a pair and
  // 5 vectors on one thread, as tiles of 3 vectors (48 rows) on two.
  check_thread_count_invariance(LORA_DTYPE_F32, 300, 100, 1300, 8);
  check_thread_count_invariance(LORA_DTYPE_F32, 64, 300, 2100, 8);
  check_thread_count_invariance(LORA_DTYPE_F32, 144, 100, 1100, 8);
  // 128 rows, W in place: tiles of 512 columns on one thread (b_rows_max_tile_n), of 256 on two.
  check_thread_count_invariance(LORA_DTYPE_F32, 128, 1000, 1100, 8);
}

// PhasedWork: every item runs once, an item of a phase only after every item of the phase
// before it has finished, on one thread or the team; a failing item fails the run but the
// others still run; empty parts and repeated barriers change nothing.
void test_phased_work() {
  for (const bool threaded : {false, true}) {
    const std::string mode = threaded ? " (threaded)" : " (one thread)";
    constexpr int64_t kItems[] = {1, 37, 5, 64};  // phases 0, 1, 1, 2: two parts share phase 1
    std::vector<std::atomic<int>> runs(1 + 37 + 5 + 64);
    std::atomic<int> finished_by_phase[3] = {};
    std::atomic<int> early{0};
    const int64_t phase_items[3] = {1, 42, 64};
    auto part = [&](int64_t offset, int phase) {
      return [&, offset, phase](int64_t item) {
        if (phase > 0 && finished_by_phase[phase - 1].load() != phase_items[phase - 1]) ++early;
        // Slow first items, so that a thread not waiting for them would start the next phase.
        if (item == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        ++runs[offset + item];
        ++finished_by_phase[phase];
        return !(phase == 2 && item == 63);  // the last item fails
      };
    };
    const auto p0 = part(0, 0), p1a = part(1, 1), p1b = part(38, 1), p2 = part(43, 2);
    const auto never = [&](int64_t) {
      ++early;
      return false;
    };
    cpu::PhasedWork work;
    work.barrier();  // nothing before it: no phase
    work.add(kItems[0], p0);
    work.add(0, never);
    work.barrier();
    work.add(kItems[1], p1a);
    work.add(kItems[2], p1b);
    work.barrier();
    work.barrier();
    work.add(kItems[3], p2);
    expect(work.items() == 107, "phased work counts its items" + mode);
    expect(!work.run(threaded), "phased work reports the failed item" + mode);
    bool once = true;
    for (const std::atomic<int>& n : runs) once = once && n.load() == 1;
    expect(once, "phased work runs every item once" + mode);
    expect(early.load() == 0, "phased work starts no item before the phase before it" + mode);
    cpu::PhasedWork empty;
    expect(empty.run(threaded), "phased work without items" + mode);
  }
}

void test_linear_invalid() {
  const Buffer x = random_buffer(LORA_DTYPE_F32, 64), w = random_buffer(LORA_DTYPE_F32, 64);
  Buffer s(LORA_DTYPE_F32, 64), y(LORA_DTYPE_F32, 64);
  const cpu::Gemm g = cpu::builtin_gemm();
  auto fwd = [&](lora_dtype_t dt, int64_t M, int64_t N, int64_t K, int64_t r, const void* xp,
                 int64_t ldx, const void* wp, void* yp, const cpu::Gemm& gemm) {
    return cpu::lora_linear_fwd(dt, M, N, K, r, xp, ldx, wp, nullptr, w.ptr(), w.ptr(), 1.0f, kOff,
                                s.ptr(), yp, gemm);
  };
  const lora_status_t bad = LORA_ERR_INVALID_ARGUMENT;
  expect_status(fwd(LORA_DTYPE_F32, -1, 2, 2, 2, x.ptr(), 2, w.ptr(), y.ptr(), g), bad, "fwd M<0");
  expect_status(fwd(LORA_DTYPE_F32, 2, 2, 2, -2, x.ptr(), 2, w.ptr(), y.ptr(), g), bad, "fwd r<0");
  expect_status(fwd(LORA_DTYPE_F32, 2, 2, 2, 2, nullptr, 2, w.ptr(), y.ptr(), g), bad,
                "fwd x NULL");
  expect_status(fwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), 2, nullptr, y.ptr(), g), bad,
                "fwd weight NULL");
  expect_status(fwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), 2, w.ptr(), nullptr, g), bad,
                "fwd y NULL");
  expect_status(fwd(LORA_DTYPE_F32, 2, 2, 4, 2, x.ptr(), 3, w.ptr(), y.ptr(), g), bad,
                "fwd ldx < K");
  expect_status(
      fwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), 2, w.ptr(), y.ptr(), cpu::Gemm{nullptr, nullptr}),
      bad, "fwd gemm NULL");
  expect_status(fwd(static_cast<lora_dtype_t>(3), 2, 2, 2, 2, x.ptr(), 2, w.ptr(), y.ptr(), g), bad,
                "fwd unknown dtype");
  expect_status(fwd(LORA_DTYPE_F32, 1, 2, 4, 2, x.ptr(), 0, w.ptr(), y.ptr(), g), LORA_OK,
                "fwd one row, any ldx");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, nullptr, x.ptr(), 2, w.ptr(), w.ptr(),
                           w.ptr(), s.ptr(), 1.0f, kOff, y.ptr(), nullptr, nullptr, g),
      bad, "bwd dy NULL");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), nullptr, 2, w.ptr(), w.ptr(),
                           w.ptr(), s.ptr(), 1.0f, kOff, nullptr, y.ptr(), nullptr, g),
      bad, "bwd x NULL with d_lora_a wanted");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), x.ptr(), 2, w.ptr(), w.ptr(),
                           w.ptr(), nullptr, 1.0f, kOff, nullptr, nullptr, y.ptr(), g),
      bad, "bwd s_saved NULL with d_lora_b wanted");
  // dS = scaling * dY B feeds both dX and dA: lora_b is needed by either.
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), x.ptr(), 2, w.ptr(), w.ptr(),
                           nullptr, s.ptr(), 1.0f, kOff, y.ptr(), nullptr, nullptr, g),
      bad, "bwd lora_b NULL with dx wanted");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), x.ptr(), 2, w.ptr(), w.ptr(),
                           nullptr, s.ptr(), 1.0f, kOff, nullptr, y.ptr(), nullptr, g),
      bad, "bwd lora_b NULL with d_lora_a wanted");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), x.ptr(), 2, w.ptr(), nullptr,
                           w.ptr(), s.ptr(), 1.0f, kOff, y.ptr(), nullptr, nullptr, g),
      bad, "bwd lora_a NULL with dx wanted");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), x.ptr(), 2, nullptr, w.ptr(),
                           w.ptr(), s.ptr(), 1.0f, kOff, y.ptr(), nullptr, nullptr, g),
      bad, "bwd weight NULL with dx wanted");
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 4, 2, x.ptr(), x.ptr(), 3, w.ptr(), w.ptr(),
                           w.ptr(), s.ptr(), 1.0f, kOff, nullptr, y.ptr(), nullptr, g),
      bad, "bwd ldx < K with d_lora_a wanted");
  // What only dB needs: dY and S (x, A, B and W may be absent).
  expect_status(
      cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), nullptr, 0, nullptr, nullptr,
                           nullptr, s.ptr(), 1.0f, kOff, nullptr, nullptr, y.ptr(), g),
      LORA_OK, "bwd d_lora_b alone from dy and s_saved");
  expect_status(cpu::lora_linear_bwd(LORA_DTYPE_F32, 2, 2, 2, 2, x.ptr(), x.ptr(), 2, w.ptr(),
                                     w.ptr(), w.ptr(), s.ptr(), 1.0f, kOff, y.ptr(), nullptr,
                                     nullptr, cpu::Gemm{nullptr, nullptr}),
                bad, "bwd gemm NULL with dx wanted");
}

// ---- multi-adapter ----------------------------------------------------------------------------

// L adapters of heterogeneous rank; every element past an adapter's rank is NaN.
struct MultiAdapters {
  int64_t L, r_max, num_slices, K;
  std::vector<int64_t> widths, offsets;
  std::vector<int32_t> ranks;
  std::vector<float> scalings;
  std::vector<Buffer> a;  // per slice [L, r_max, K], or [L, K, r_max] when a_transposed
  std::vector<Buffer> b;  // per slice [L, width, r_max]
  bool a_transposed = false;
  int64_t b_col_stride = 1;  // 2: B stored with a gap after every rank element (generic path)
};

MultiAdapters make_adapters(lora_dtype_t dt, int64_t L, int64_t r_max, int64_t K,
                            std::vector<int64_t> widths, bool a_transposed, int64_t b_col_stride) {
  MultiAdapters m;
  m.L = L;
  m.r_max = r_max;
  m.K = K;
  m.num_slices = static_cast<int64_t>(widths.size());
  m.widths = widths;
  m.a_transposed = a_transposed;
  m.b_col_stride = b_col_stride;
  int64_t off = 0;
  for (int64_t w : widths) {
    m.offsets.push_back(off);
    off += w;
  }
  for (int64_t l = 0; l < L; ++l) {
    // Ranks 0, r_max and values between; a rank-0 adapter behaves as -1.
    const int32_t rank =
        l == 0 ? static_cast<int32_t>(r_max) : static_cast<int32_t>((l * 7 + 3) % (r_max + 1));
    m.ranks.push_back(rank);
    m.scalings.push_back(0.5f + 0.25f * static_cast<float>(l % 3));
  }
  for (int64_t s = 0; s < m.num_slices; ++s) {
    Buffer a = random_buffer(dt, L * r_max * K);
    Buffer b = random_buffer(dt, L * widths[s] * r_max * b_col_stride);
    for (size_t e = 0; e < b.size(); ++e) {
      if (e % b_col_stride != 0) b.set(e, NAN);  // the gaps of a strided B are never read
    }
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t j = m.ranks[l]; j < r_max; ++j) {
        for (int64_t k = 0; k < K; ++k) {
          a.set(a_transposed ? (l * K + k) * r_max + j : (l * r_max + j) * K + k, NAN);
        }
        for (int64_t n = 0; n < widths[s]; ++n) {
          b.set(((l * widths[s] + n) * r_max + j) * b_col_stride, NAN);
        }
      }
    }
    m.a.push_back(std::move(a));
    m.b.push_back(std::move(b));
  }
  return m;
}

double a_elem(const MultiAdapters& m, int64_t s, int64_t l, int64_t j, int64_t k) {
  return m.a[s].get(m.a_transposed ? (l * m.K + k) * m.r_max + j : (l * m.r_max + j) * m.K + k);
}

double b_elem(const MultiAdapters& m, int64_t s, int64_t l, int64_t n, int64_t j) {
  return m.b[s].get(((l * m.widths[s] + n) * m.r_max + j) * m.b_col_stride);
}

std::vector<AdapterStack> a_stacks(const MultiAdapters& m) {
  std::vector<AdapterStack> out;
  for (const Buffer& a : m.a) {
    if (m.a_transposed) {
      out.push_back(AdapterStack{a.ptr(), m.K * m.r_max, 1, m.r_max});
    } else {
      out.push_back(AdapterStack{a.ptr(), m.r_max * m.K, m.K, 1});
    }
  }
  return out;
}

std::vector<AdapterStack> b_stacks(const MultiAdapters& m) {
  std::vector<AdapterStack> out;
  for (int64_t s = 0; s < m.num_slices; ++s) {
    out.push_back(AdapterStack{m.b[s].ptr(), m.widths[s] * m.r_max * m.b_col_stride,
                               m.r_max * m.b_col_stride, m.b_col_stride});
  }
  return out;
}

// Adapter of each row in both index forms. Segments group equal neighbours of `token`.
struct Index {
  std::vector<int32_t> token;
  std::vector<int32_t> seg_indptr, seg_adapter;

  lora_adapter_index_t tokens() const {
    return lora_adapter_index_t{token.empty() ? nullptr : token.data(), nullptr, nullptr, 0};
  }
  lora_adapter_index_t segments() const {
    return lora_adapter_index_t{nullptr, seg_indptr.data(),
                                seg_adapter.empty() ? nullptr : seg_adapter.data(),
                                static_cast<int64_t>(seg_adapter.size())};
  }
};

// Appends `len` rows of adapter `a` to both forms, as one segment.
void add_run(Index& idx, int32_t a, int64_t len) {
  idx.token.insert(idx.token.end(), static_cast<size_t>(len), a);
  idx.seg_adapter.push_back(a);
  idx.seg_indptr.push_back(static_cast<int32_t>(idx.token.size()));
}

// Runs of random length with adapters drawn from [-1, L+1] plus a far out-of-range value. Empty
// segments of adapter 0 (rank r_max) at the start, after every third run and at the end: they
// hold no rows.
Index make_index(int64_t M, int64_t L) {
  Index idx;
  idx.seg_indptr.push_back(0);
  add_run(idx, 0, 0);
  std::uniform_int_distribution<int> run_len(1, 5), adapter(-1, static_cast<int>(L) + 1);
  int64_t i = 0;
  while (i < M) {
    const int64_t len = std::min<int64_t>(run_len(g_rng), M - i);
    const int32_t a = (g_rng() % 11 == 0) ? 1000000 : adapter(g_rng);
    add_run(idx, a, len);
    if (idx.seg_adapter.size() % 4 == 0) add_run(idx, 0, 0);
    i += len;
  }
  add_run(idx, 0, 0);
  return idx;
}

// Every seventh row on adapter 0, the others on none: at M = 3208, 2749 idle rows, a prime, so
// that no thread count splits them evenly.
Index sparse_index(int64_t M, int64_t) {
  Index idx;
  idx.seg_indptr.push_back(0);
  for (int64_t i = 0; i < M; i += 7) {
    add_run(idx, 0, 1);
    add_run(idx, -1, std::min<int64_t>(6, M - i - 1));
  }
  return idx;
}

// The adapter a token really uses (-1: none), as every kernel must read the index.
int64_t effective_adapter(const MultiAdapters& m, int32_t a) {
  return (a >= 0 && a < m.L && m.ranks[a] > 0) ? a : -1;
}

std::string multi_name(const char* op, lora_dtype_t dt, int64_t M, const MultiAdapters& m,
                       bool segments) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s M=%lld K=%lld L=%lld r_max=%lld slices=%lld %s%s%s", op,
                dtype_name(dt), static_cast<long long>(M), static_cast<long long>(m.K),
                static_cast<long long>(m.L), static_cast<long long>(m.r_max),
                static_cast<long long>(m.num_slices), segments ? "segments" : "tokens",
                m.a_transposed ? " a^T-view" : "", m.b_col_stride != 1 ? " b-strided" : "");
  return buf;
}

// t = shrink oracle: t[s, i, j] = scaling * x[i] . A_s[a][j] for j < rank, else 0.
void shrink_oracle(const MultiAdapters& m, const Index& idx, const Buffer& x, int64_t M,
                   int64_t ldx, std::vector<double>& t, std::vector<double>& mag) {
  t.assign(m.num_slices * M * m.r_max, 0.0);
  mag.assign(t.size(), 0.0);
  for (int64_t s = 0; s < m.num_slices; ++s) {
    for (int64_t i = 0; i < M; ++i) {
      const int64_t a = effective_adapter(m, idx.token[i]);
      if (a < 0) continue;
      for (int64_t j = 0; j < m.ranks[a]; ++j) {
        double v = 0, va = 0;
        for (int64_t k = 0; k < m.K; ++k) {
          v += x.get(i * ldx + k) * a_elem(m, s, a, j, k);
          va += std::fabs(x.get(i * ldx + k) * a_elem(m, s, a, j, k));
        }
        t[(s * M + i) * m.r_max + j] = m.scalings[a] * v;
        mag[(s * M + i) * m.r_max + j] = std::fabs(m.scalings[a]) * va;
      }
    }
  }
}

void test_multi_case(lora_dtype_t dt, int64_t M, int64_t K, int64_t L, int64_t r_max,
                     std::vector<int64_t> widths, bool a_transposed, int64_t b_col_stride,
                     Index (*index_of)(int64_t, int64_t) = make_index) {
  const MultiAdapters m = make_adapters(dt, L, r_max, K, widths, a_transposed, b_col_stride);
  const Index idx = index_of(M, L);
  const int64_t ldx = K + 2;
  const Buffer x = random_buffer(dt, M * ldx);
  const std::vector<AdapterStack> as = a_stacks(m), bs = b_stacks(m);
  int64_t N = 0;
  for (int64_t w : widths) N += w;
  const int64_t ldy = N + 3;

  std::vector<double> t_ref, t_mag;
  shrink_oracle(m, idx, x, M, ldx, t_ref, t_mag);

  for (bool segments : {false, true}) {
    const lora_adapter_index_t index = segments ? idx.segments() : idx.tokens();
    // shrink
    std::vector<float> t(m.num_slices * M * r_max, NAN);
    expect_status(cpu::multi_lora_shrink(dt, M, K, L, r_max, m.num_slices, x.ptr(), ldx, as.data(),
                                         m.scalings.data(), m.ranks.data(), index,
                                         t.empty() ? nullptr : t.data()),
                  LORA_OK, multi_name("shrink", dt, M, m, segments));
    expect_close(
        multi_name("shrink t", dt, M, m, segments), t.size(),
        [&](size_t e) { return static_cast<double>(t[e]); }, t_ref, t_mag, rel_tol(dt, K));

    // expand: from a t with NaN past every rank (never read) into a padded y
    std::vector<float> t_in = random_floats(m.num_slices * M * r_max);
    for (int64_t s = 0; s < m.num_slices; ++s) {
      for (int64_t i = 0; i < M; ++i) {
        const int64_t a = effective_adapter(m, idx.token[i]);
        for (int64_t j = a < 0 ? 0 : m.ranks[a]; j < r_max; ++j) {
          t_in[(s * M + i) * r_max + j] = NAN;
        }
      }
    }
    const Buffer y0 = random_buffer(dt, M * ldy);
    Buffer y = y0;
    std::vector<double> y_ref(M * ldy), y_mag(M * ldy);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t a = effective_adapter(m, idx.token[i]);
      for (int64_t c = 0; c < ldy; ++c) {
        y_ref[i * ldy + c] = y0.get(i * ldy + c);
        y_mag[i * ldy + c] = std::fabs(y0.get(i * ldy + c));
      }
      if (a < 0) continue;
      for (int64_t s = 0; s < m.num_slices; ++s) {
        for (int64_t n = 0; n < widths[s]; ++n) {
          double v = 0, va = 0;
          for (int64_t j = 0; j < m.ranks[a]; ++j) {
            v += t_in[(s * M + i) * r_max + j] * b_elem(m, s, a, n, j);
            va += std::fabs(t_in[(s * M + i) * r_max + j] * b_elem(m, s, a, n, j));
          }
          y_ref[i * ldy + m.offsets[s] + n] += v;
          y_mag[i * ldy + m.offsets[s] + n] += va;
        }
      }
    }
    expect_status(
        cpu::multi_lora_expand(dt, M, L, r_max, m.num_slices, t_in.empty() ? nullptr : t_in.data(),
                               bs.data(), m.offsets.data(), m.widths.data(), m.ranks.data(), index,
                               y.ptr(), ldy),
        LORA_OK, multi_name("expand", dt, M, m, segments));
    expect_close(
        multi_name("expand y", dt, M, m, segments), y_ref.size(),
        [&](size_t e) { return y.get(e); }, y_ref, y_mag, rel_tol(dt, r_max));
    bool idle_untouched = true;
    for (int64_t i = 0; i < M; ++i) {
      if (effective_adapter(m, idx.token[i]) >= 0) continue;
      idle_untouched &= std::memcmp(&y.bytes[i * ldy * dtype_size(dt)],
                                    &y0.bytes[i * ldy * dtype_size(dt)], ldy * dtype_size(dt)) == 0;
    }
    expect(idle_untouched,
           multi_name("expand leaves rows without adapter bit-identical", dt, M, m, segments));

    // fused layer: y = x W^T + b + multi-adapter term, slices tiling [0, N)
    const Buffer w = random_buffer(dt, N * K), bias = random_buffer(dt, N);
    std::vector<double> f_ref(M * N), f_mag(M * N);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t a = effective_adapter(m, idx.token[i]);
      for (int64_t s = 0; s < m.num_slices; ++s) {
        for (int64_t n = 0; n < widths[s]; ++n) {
          const int64_t col = m.offsets[s] + n;
          double v = bias.get(col), va = std::fabs(v);
          for (int64_t k = 0; k < K; ++k) {
            v += x.get(i * ldx + k) * w.get(col * K + k);
            va += std::fabs(x.get(i * ldx + k) * w.get(col * K + k));
          }
          if (a >= 0) {
            for (int64_t j = 0; j < m.ranks[a]; ++j) {
              v += t_ref[(s * M + i) * r_max + j] * b_elem(m, s, a, n, j);
              va += t_mag[(s * M + i) * r_max + j] * std::fabs(b_elem(m, s, a, n, j));
            }
          }
          f_ref[i * N + col] = v;
          f_mag[i * N + col] = va;
        }
      }
    }
    std::vector<float> t_ws(m.num_slices * M * r_max, NAN);
    Buffer yf(dt, M * N);
    yf.fill(NAN);
    expect_status(
        cpu::multi_lora_linear_fwd(
            dt, M, N, K, L, r_max, m.num_slices, x.ptr(), ldx, w.ptr(), bias.ptr(), as.data(),
            bs.data(), m.offsets.data(), m.widths.data(), m.scalings.data(), m.ranks.data(), index,
            t_ws.empty() ? nullptr : t_ws.data(), yf.ptr(), cpu::builtin_gemm()),
        LORA_OK, multi_name("linear_fwd", dt, M, m, segments));
    expect_close(
        multi_name("linear_fwd y", dt, M, m, segments), f_ref.size(),
        [&](size_t e) { return yf.get(e); }, f_ref, f_mag, rel_tol(dt, K + r_max));
    expect_close(
        multi_name("linear_fwd t", dt, M, m, segments), t_ws.size(),
        [&](size_t e) { return static_cast<double>(t_ws[e]); }, t_ref, t_mag, rel_tol(dt, K));

    // linear_dx: dx = dY W + sum_s dT_s A_s[a], dT being t_in (NaN past every rank, never to be
    // read) and dx NaN before the call (every element must be written). dx is rounded once per
    // slice term and once more by the base GEMM.
    const Buffer dy = random_buffer(dt, M * N);
    std::vector<double> d_ref(M * K), d_mag(M * K);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t a = effective_adapter(m, idx.token[i]);
      for (int64_t k = 0; k < K; ++k) {
        double v = 0, va = 0;
        for (int64_t n = 0; n < N; ++n) {
          v += dy.get(i * N + n) * w.get(n * K + k);
          va += std::fabs(dy.get(i * N + n) * w.get(n * K + k));
        }
        for (int64_t s = 0; a >= 0 && s < m.num_slices; ++s) {
          for (int64_t j = 0; j < m.ranks[a]; ++j) {
            v += t_in[(s * M + i) * r_max + j] * a_elem(m, s, a, j, k);
            va += std::fabs(t_in[(s * M + i) * r_max + j] * a_elem(m, s, a, j, k));
          }
        }
        d_ref[i * K + k] = v;
        d_mag[i * K + k] = va;
      }
    }
    Buffer dx(dt, M * K);
    dx.fill(NAN);
    expect_status(
        cpu::multi_lora_linear_dx(dt, M, N, K, L, r_max, m.num_slices, dy.ptr(), w.ptr(),
                                  as.data(), t_in.empty() ? nullptr : t_in.data(), m.ranks.data(),
                                  index, dx.ptr(), cpu::builtin_gemm()),
        LORA_OK, multi_name("linear_dx", dt, M, m, segments));
    expect_close(
        multi_name("linear_dx dx", dt, M, m, segments), d_ref.size(),
        [&](size_t e) { return dx.get(e); }, d_ref, d_mag,
        rel_tol(dt, N + r_max) + m.num_slices * unit_roundoff(dt));
  }
}

void test_multi() {
  for (lora_dtype_t dt : {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16}) {
    test_multi_case(dt, 1, 7, 2, 3, {5}, false, 1);
    test_multi_case(dt, 29, 33, 5, 8, {17, 9, 9}, false, 1);
    test_multi_case(dt, 64, 300, 9, 20, {40, 24}, true, 2);
  }
  test_multi_case(LORA_DTYPE_F32, 133, 70, 4, 64, {300}, false, 1);
  test_multi_case(LORA_DTYPE_BF16, 520, 270, 3, 16, {100, 60, 60}, false, 1);
  test_multi_case(LORA_DTYPE_F32, 0, 7, 3, 4, {5, 6}, false, 1);
  test_multi_case(LORA_DTYPE_F16, 40, 50, 300, 4, {8}, false, 1);  // many adapters, few rows
  test_multi_case(LORA_DTYPE_F32, 11, 13, 1, 0, {7}, false, 1);    // r_max = 0
  test_multi_case(LORA_DTYPE_F32, 29, 33, 5, 8, {17, 0, 9}, false, 1);   // an empty slice
  test_multi_case(LORA_DTYPE_BF16, 64, 300, 9, 20, {0, 40}, true, 2);
  // Most rows idle, enough of them that their fill of y (and of dx) is split over the threads.
  test_multi_case(LORA_DTYPE_F16, 3208, 100, 2, 4, {96, 97}, false, 1, sparse_index);
}

// linear_dx with the two slices' terms on two threads at once: one tile per term (16 rows,
// K = 64) deep enough (rank 4096) to wake the team, so that unless the second term waits for the
// first, its read-add races the first one's write. Slice 0's A has a gap after every element, so
// its term (gathering A) tends to end after slice 1's (A contiguous): the race then shows as the
// first term's write replacing the second's sum. Repeated, as a race need not show every time.
void test_multi_dx_slice_order() {
  const lora_dtype_t dt = LORA_DTYPE_F32;
  const int64_t M = 16, K = 64, N = 8, r_max = 4096, reps = 300;
  const int64_t gap[2] = {2, 1};
  std::vector<Buffer> a;
  std::vector<AdapterStack> as;
  for (int64_t s = 0; s < 2; ++s) {
    a.push_back(random_buffer(dt, r_max * K * gap[s]));
    for (size_t e = 0; e < a[s].size(); ++e) {
      if (e % gap[s] != 0) a[s].set(e, NAN);  // never read
    }
    as.push_back(AdapterStack{a[s].ptr(), r_max * K * gap[s], K * gap[s], gap[s]});
  }
  const std::vector<int32_t> ranks = {static_cast<int32_t>(r_max)};
  const std::vector<int32_t> tokens(M, 0);
  const lora_adapter_index_t index{tokens.data(), nullptr, nullptr, 0};
  const Buffer dy = random_buffer(dt, M * N), w = random_buffer(dt, N * K);
  const std::vector<float> dts = random_floats(2 * M * r_max);
  std::vector<double> want(M * K), mag(M * K);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      double v = 0, va = 0;
      for (int64_t n = 0; n < N; ++n) {
        v += dy.get(i * N + n) * w.get(n * K + k);
        va += std::fabs(dy.get(i * N + n) * w.get(n * K + k));
      }
      for (int64_t s = 0; s < 2; ++s) {
        for (int64_t j = 0; j < r_max; ++j) {
          const double p = dts[(s * M + i) * r_max + j] * a[s].get((j * K + k) * gap[s]);
          v += p;
          va += std::fabs(p);
        }
      }
      want[i * K + k] = v;
      mag[i * K + k] = va;
    }
  }
  const double tol = rel_tol(dt, N + r_max) + 2 * unit_roundoff(dt);
  int64_t wrong = 0;
  for (int64_t rep = 0; rep < reps; ++rep) {
    Buffer dx(dt, M * K);
    dx.fill(NAN);
    const lora_status_t st =
        cpu::multi_lora_linear_dx(dt, M, N, K, 1, r_max, 2, dy.ptr(), w.ptr(), as.data(),
                                  dts.data(), ranks.data(), index, dx.ptr(), cpu::builtin_gemm());
    bool ok = st == LORA_OK;
    for (int64_t e = 0; e < M * K; ++e) ok &= close(dx.get(e), want[e], mag[e], tol);
    wrong += ok ? 0 : 1;
  }
  expect(wrong == 0, "linear_dx adds the slices' terms in turn on threads: " +
                         std::to_string(wrong) + " of " + std::to_string(reps) + " calls wrong");
}

void test_multi_invalid() {
  const int64_t M = 4, K = 8, L = 2, r_max = 4;
  const Buffer x = random_buffer(LORA_DTYPE_F32, M * K), w = random_buffer(LORA_DTYPE_F32, 64);
  const Buffer a = random_buffer(LORA_DTYPE_F32, L * r_max * K);
  const Buffer b = random_buffer(LORA_DTYPE_F32, L * 8 * r_max);
  Buffer y(LORA_DTYPE_F32, M * 8);
  std::vector<float> t(LORA_MAX_SLICES * M * r_max), scal = {1.0f, 1.0f};
  std::vector<int32_t> ranks = {4, 2}, tok = {0, 1, -1, 0}, indptr = {0, 2, 4}, sa = {0, 1};
  std::vector<AdapterStack> as(LORA_MAX_SLICES + 1, AdapterStack{a.ptr(), r_max * K, K, 1});
  std::vector<AdapterStack> bs(LORA_MAX_SLICES + 1, AdapterStack{b.ptr(), 8 * r_max, r_max, 1});
  const lora_adapter_index_t by_token{tok.data(), nullptr, nullptr, 0};
  const lora_adapter_index_t by_seg{nullptr, indptr.data(), sa.data(), 2};
  const lora_status_t bad = LORA_ERR_INVALID_ARGUMENT;

  auto shrink = [&](int64_t num_slices, const int32_t* rk, lora_adapter_index_t index,
                    const void* xp) {
    return cpu::multi_lora_shrink(LORA_DTYPE_F32, M, K, L, r_max, num_slices, xp, K, as.data(),
                                  scal.data(), rk, index, t.data());
  };
  expect_status(shrink(1, ranks.data(), by_token, x.ptr()), LORA_OK, "shrink valid tokens");
  expect_status(shrink(1, ranks.data(), by_seg, x.ptr()), LORA_OK, "shrink valid segments");
  expect_status(shrink(0, ranks.data(), by_token, x.ptr()), bad, "shrink 0 slices");
  expect_status(shrink(LORA_MAX_SLICES + 1, ranks.data(), by_token, x.ptr()), LORA_ERR_UNSUPPORTED,
                "shrink too many slices");
  expect_status(shrink(1, ranks.data(), by_token, nullptr), bad, "shrink x NULL");
  const AdapterStack no_data{nullptr, r_max * K, K, 1};
  expect_status(cpu::multi_lora_shrink(LORA_DTYPE_F32, M, K, L, r_max, 1, x.ptr(), K, &no_data,
                                       scal.data(), ranks.data(), by_token, t.data()),
                bad, "shrink lora_a[0] data NULL");
  expect_status(cpu::multi_lora_shrink(LORA_DTYPE_F32, M, K, L, r_max, 1, x.ptr(), K, nullptr,
                                       scal.data(), ranks.data(), by_token, t.data()),
                bad, "shrink lora_a NULL");
  expect_status(shrink(1, nullptr, by_token, x.ptr()), bad, "shrink ranks NULL");
  std::vector<int32_t> big_rank = {5, 2}, neg_rank = {-1, 2};
  expect_status(shrink(1, big_rank.data(), by_token, x.ptr()), bad, "shrink rank > r_max");
  expect_status(shrink(1, neg_rank.data(), by_token, x.ptr()), bad, "shrink rank < 0");
  expect_status(
      shrink(1, ranks.data(), lora_adapter_index_t{nullptr, nullptr, nullptr, 0}, x.ptr()), bad,
      "shrink no index");
  expect_status(shrink(1, ranks.data(),
                       lora_adapter_index_t{tok.data(), indptr.data(), sa.data(), 2}, x.ptr()),
                bad, "shrink both index forms");
  std::vector<int32_t> short_indptr = {0, 2, 3}, falling = {0, 3, 2, 4}, late_start = {1, 2, 4};
  expect_status(shrink(1, ranks.data(),
                       lora_adapter_index_t{nullptr, short_indptr.data(), sa.data(), 2}, x.ptr()),
                bad, "shrink segments ending before M");
  std::vector<int32_t> sa3 = {0, 1, 0};
  expect_status(shrink(1, ranks.data(),
                       lora_adapter_index_t{nullptr, falling.data(), sa3.data(), 3}, x.ptr()),
                bad, "shrink decreasing seg_indptr");
  expect_status(shrink(1, ranks.data(),
                       lora_adapter_index_t{nullptr, late_start.data(), sa.data(), 2}, x.ptr()),
                bad, "shrink seg_indptr[0] != 0");
  expect_status(
      shrink(1, ranks.data(), lora_adapter_index_t{nullptr, indptr.data(), nullptr, 2}, x.ptr()),
      bad, "shrink seg_adapter NULL");
  // seg_indptr[-1] == M: a negative count read as it stands would pass the bounds checks.
  std::vector<int32_t> m_then_indptr = {static_cast<int32_t>(M), 0, 2, 4};
  expect_status(shrink(1, ranks.data(),
                       lora_adapter_index_t{nullptr, m_then_indptr.data() + 1, sa.data(), -1},
                       x.ptr()),
                bad, "shrink negative num_segments");
  expect_status(cpu::multi_lora_shrink(LORA_DTYPE_F32, M, K, L, r_max, 1, x.ptr(), K - 1, as.data(),
                                       scal.data(), ranks.data(), by_token, t.data()),
                bad, "shrink ldx < K");

  std::vector<int64_t> off = {0, 4}, wid = {4, 4}, overlap = {0, 3};
  auto expand = [&](int64_t num_slices, const int64_t* o, const int64_t* wd, int64_t ldy) {
    return cpu::multi_lora_expand(LORA_DTYPE_F32, M, L, r_max, num_slices, t.data(), bs.data(), o,
                                  wd, ranks.data(), by_token, y.ptr(), ldy);
  };
  expect_status(expand(2, off.data(), wid.data(), 8), LORA_OK, "expand valid");
  expect_status(expand(2, overlap.data(), wid.data(), 8), bad, "expand overlapping slices");
  expect_status(expand(2, off.data(), wid.data(), 7), bad, "expand slice past ldy");
  expect_status(expand(2, off.data(), wid.data(), -8), bad, "expand negative ldy (rows before y)");
  // An end past int64 (offset + width wrapped negative and passed before).
  std::vector<int64_t> huge = {0, std::numeric_limits<int64_t>::max() - 1};
  expect_status(expand(2, huge.data(), wid.data(), 8), bad, "expand offset + width past int64");
  expect_status(cpu::multi_lora_expand(LORA_DTYPE_F32, 1, L, r_max, 2, t.data(), bs.data(),
                                       huge.data(), wid.data(), ranks.data(), by_token, y.ptr(), 8),
                bad, "expand offset + width past int64, one row");
  expect_status(expand(2, nullptr, wid.data(), 8), bad, "expand slice_offset NULL");
  expect_status(expand(0, off.data(), wid.data(), 8), bad, "expand 0 slices");

  auto fused = [&](int64_t N, const int64_t* o, const int64_t* wd, const cpu::Gemm& g) {
    return cpu::multi_lora_linear_fwd(LORA_DTYPE_F32, M, N, K, L, r_max, 2, x.ptr(), K, w.ptr(),
                                      nullptr, as.data(), bs.data(), o, wd, scal.data(),
                                      ranks.data(), by_token, t.data(), y.ptr(), g);
  };
  expect_status(fused(8, off.data(), wid.data(), cpu::builtin_gemm()), LORA_OK, "linear_fwd valid");
  expect_status(fused(9, off.data(), wid.data(), cpu::builtin_gemm()), bad,
                "linear_fwd slices not covering N");
  std::vector<int64_t> gap = {0, 5}, gap_w = {4, 4};
  expect_status(fused(8, gap.data(), gap_w.data(), cpu::builtin_gemm()), bad,
                "linear_fwd slices with a gap, the last past N");
  expect_status(fused(8, off.data(), wid.data(), cpu::Gemm{nullptr, nullptr}), bad,
                "linear_fwd gemm NULL");

  // No adapters (L = 0): ranks, scalings and the stacks' data may be NULL; every row is idle.
  const AdapterStack no_adapters{nullptr, 0, 0, 0};
  std::vector<float> t0(M * r_max, NAN);
  expect_status(cpu::multi_lora_shrink(LORA_DTYPE_F32, M, K, 0, r_max, 1, x.ptr(), K,
                                       &no_adapters, nullptr, nullptr, by_token, t0.data()),
                LORA_OK, "shrink L=0, ranks NULL");
  bool zeros = true;
  for (float v : t0) zeros &= v == 0.0f;
  expect(zeros, "shrink L=0 gives t = 0");
  std::vector<float> u0(M * r_max, 1.0f);
  expect_status(cpu::multi_lora_adapter_grad(LORA_DTYPE_F32, LORA_DTYPE_F32, M, r_max, K, 0,
                                             u0.data(), r_max, x.ptr(), K, nullptr, 1, by_token,
                                             LORA_DTYPE_F32, nullptr),
                LORA_OK, "adapter_grad L=0, ranks and out NULL");
}

// multi_lora_adapter_grad against a double loop over the tokens: out[a] = sum of u_i^T v_i over
// a's tokens, zero past ranks[a] along rank_dim and for adapters without tokens (out starts as
// NaN: every element must be written). The rank side is fp32 (dT or T) with NaN past each rank,
// never to be read; the wide side (x or dY) is `dt`, rows `pad` elements longer than used.
void test_adapter_grad_case(lora_dtype_t dt, int rank_dim, int64_t M, int64_t L, int64_t r_max,
                            int64_t wide, bool segments, bool out_in_dt = false) {
  const int64_t pad = 3, ld_wide = wide + pad;
  const Index idx = make_index(M, L);
  std::vector<int32_t> ranks;
  for (int64_t l = 0; l < L; ++l) {
    ranks.push_back(l == 0 ? static_cast<int32_t>(r_max)
                           : static_cast<int32_t>((l * 5 + 2) % (r_max + 1)));
  }
  const auto adapter_of = [&](int64_t i) {
    const int32_t a = idx.token[i];
    return (a >= 0 && a < L && ranks[a] > 0) ? a : -1;
  };
  Buffer rank_side = random_buffer(LORA_DTYPE_F32, M * r_max);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t a = adapter_of(i);
    for (int64_t j = a < 0 ? r_max : ranks[a]; j < r_max; ++j) rank_side.set(i * r_max + j, NAN);
  }
  const Buffer wide_side = random_buffer(dt, M * ld_wide);
  const bool u_is_rank = rank_dim == 1;
  const int64_t P = u_is_rank ? r_max : wide, Q = u_is_rank ? wide : r_max;
  const lora_dtype_t out_dtype = out_in_dt ? dt : LORA_DTYPE_F32;
  Buffer out(out_dtype, L * P * Q);
  out.fill(NAN);
  std::vector<double> want(out.size(), 0.0), mag(out.size(), 0.0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t a = adapter_of(i);
    if (a < 0) continue;
    for (int64_t j = 0; j < ranks[a]; ++j) {
      for (int64_t w = 0; w < wide; ++w) {
        const double v = rank_side.get(i * r_max + j) * wide_side.get(i * ld_wide + w);
        const int64_t e = a * P * Q + (u_is_rank ? j * Q + w : w * Q + j);
        want[e] += v;
        mag[e] += std::fabs(v);
      }
    }
  }
  const void* u = u_is_rank ? rank_side.ptr() : wide_side.ptr();
  const void* v = u_is_rank ? wide_side.ptr() : rank_side.ptr();
  const lora_status_t st = cpu::multi_lora_adapter_grad(
      u_is_rank ? LORA_DTYPE_F32 : dt, u_is_rank ? dt : LORA_DTYPE_F32, M, P, Q, L, u,
      u_is_rank ? r_max : ld_wide, v, u_is_rank ? ld_wide : r_max, ranks.data(), rank_dim,
      segments ? idx.segments() : idx.tokens(), out_dtype, out.ptr());
  char name[180];
  std::snprintf(name, sizeof name,
                "adapter_grad %s rank_dim=%d M=%lld L=%lld r_max=%lld wide=%lld %s out %s",
                dtype_name(dt), rank_dim, static_cast<long long>(M), static_cast<long long>(L),
                static_cast<long long>(r_max), static_cast<long long>(wide),
                segments ? "segments" : "tokens", dtype_name(out_dtype));
  expect_status(st, LORA_OK, name);
  // fp32 sums, then one rounding to the output's dtype.
  const double tol = std::max(1e-5, 2 * unit_roundoff(out_dtype));
  expect_close(name, out.size(), [&](size_t e) { return out.get(e); }, want, mag, tol);
}

void test_adapter_grad() {
  for (lora_dtype_t dt : {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16}) {
    for (int rank_dim : {1, 2}) {
      for (bool segments : {false, true}) {
        test_adapter_grad_case(dt, rank_dim, 37, 5, 13, 21, segments);
        test_adapter_grad_case(dt, rank_dim, 1, 3, 4, 9, segments);
      }
      test_adapter_grad_case(dt, rank_dim, 0, 3, 4, 9, false);
      test_adapter_grad_case(dt, rank_dim, 9, 40, 16, 70, false);   // a pool larger than the batch
      test_adapter_grad_case(dt, rank_dim, 300, 3, 16, 40, true);   // long groups, read in place
      test_adapter_grad_case(dt, rank_dim, 37, 5, 13, 21, false, /*out_in_dt=*/true);
    }
  }
  const int64_t M = 4, P = 3, Q = 5, L = 2;
  std::vector<float> u(M * P, 1.0f), v(M * Q, 1.0f), out(L * P * Q);
  std::vector<int32_t> ranks = {3, 1}, tok = {0, 1, -1, 0}, big = {4, 1};
  const lora_adapter_index_t by_token{tok.data(), nullptr, nullptr, 0};
  const auto grad = [&](lora_dtype_t du, lora_dtype_t dv, int rank_dim, int64_t ldu,
                        const int32_t* rk, float* o, lora_dtype_t d_out = LORA_DTYPE_F32) {
    return cpu::multi_lora_adapter_grad(du, dv, M, P, Q, L, u.data(), ldu, v.data(), Q, rk,
                                        rank_dim, by_token, d_out, o);
  };
  const lora_status_t bad = LORA_ERR_INVALID_ARGUMENT;
  expect_status(grad(LORA_DTYPE_F32, LORA_DTYPE_F32, 1, P, ranks.data(), out.data()), LORA_OK,
                "adapter_grad valid");
  expect_status(grad(LORA_DTYPE_F16, LORA_DTYPE_BF16, 1, P, ranks.data(), out.data()),
                LORA_ERR_UNSUPPORTED, "adapter_grad neither operand fp32");
  expect_status(grad(LORA_DTYPE_F32, static_cast<lora_dtype_t>(7), 1, P, ranks.data(), out.data()),
                bad, "adapter_grad unknown dtype");
  expect_status(grad(LORA_DTYPE_F32, LORA_DTYPE_F32, 0, P, ranks.data(), out.data()), bad,
                "adapter_grad rank_dim 0");
  expect_status(grad(LORA_DTYPE_F32, LORA_DTYPE_F32, 1, P, big.data(), out.data()), bad,
                "adapter_grad rank > r_max");
  expect_status(grad(LORA_DTYPE_F32, LORA_DTYPE_F32, 1, P - 1, ranks.data(), out.data()), bad,
                "adapter_grad ldu < P");
  expect_status(cpu::multi_lora_adapter_grad(LORA_DTYPE_F32, LORA_DTYPE_F32, M, P, Q, L, u.data(),
                                             P, v.data(), Q - 1, ranks.data(), 1, by_token,
                                             LORA_DTYPE_F32, out.data()),
                bad, "adapter_grad ldv < Q");
  expect_status(grad(LORA_DTYPE_F32, LORA_DTYPE_F32, 1, P, ranks.data(), nullptr), bad,
                "adapter_grad out NULL");
  expect_status(grad(LORA_DTYPE_F32, LORA_DTYPE_F32, 1, P, ranks.data(), out.data(),
                     static_cast<lora_dtype_t>(-3)),
                bad, "adapter_grad unknown out dtype");
}

}  // namespace

int main() {
  test_conversions();
  test_vector_widening();
  test_builtin_gemm();
  test_builtin_gemm_choice();
  test_b_rows_tile_plan();
  test_linear();
  test_dropout_masks_nan();
  test_strided_dropout_operands();
  test_linear_empty();
  test_thread_count_invariance();
  test_phased_work();
  test_linear_invalid();
  test_multi();
  test_multi_dx_slice_order();
  test_multi_invalid();
  test_adapter_grad();
  std::printf("test_cpu_kernels: %d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
