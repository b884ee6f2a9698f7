// The register-level kernels of the CPU GEMM engine (packed_gemm.h tiles a product and calls
// them): the micro-kernel over packed panels (fp32, and bf16 pairs with AVX512_BF16), its twin
// that reads the broadcast operand from rows in place, and the streamed path's dot products along
// k and rows scaled along j. Every one sums in fp32 in an order fixed by the shapes alone.
#ifndef LORA_OPS_CPU_GEMM_KERNELS_H_
#define LORA_OPS_CPU_GEMM_KERNELS_H_

#include <array>
#include <cstdint>
#include <utility>

#include "cpu/dtype.h"
#include "cpu/vec.h"

namespace lora_ops::cpu {

// kMR x kNR accumulators plus two B vectors and one broadcast of A: 12 + 3 of the 16 registers
// of SSE/AVX2, 24 + 3 of AVX-512's 32 (twice the rows of A per loaded B vector, so the
// micro-kernel issues 2 loads per FMA pair instead of 4 / 3).
inline constexpr int64_t kMR = kVecLen == 16 ? 12 : 6;
inline constexpr int64_t kNR = 2 * kVecLen;

// Rows of a streamed B along j applied per pass over the sums (scale_rows_into): two vectors of
// each in registers, with their broadcast factors, fill AVX-512's 32 registers at 8 rows and
// SSE's / AVX2's 16 at 4.
inline constexpr int64_t kAlongJRowsPerPass = kVecLen == 16 ? 8 : 4;

// c[R x V vectors] (row stride ldc) = (accumulate ? c : 0) + sum_p s(i, p) v[p, :] for i < R:
// per step p, R broadcast scalars against V vectors of v, read from consecutive kNR-wide panels
// (panels `panel_stride` floats apart), two vectors from each panel row, the last maybe one.
template <int R, class Scalar, int V = 2>
inline void micro_kernel_tile(int64_t kc, Scalar s, const float* __restrict v,
                              int64_t panel_stride, float* __restrict c, int64_t ldc,
                              bool accumulate) {
  static_assert(V >= 1 && kNR == 2 * kVecLen, "two vectors per panel row");
  VecF acc[R][V];
  for (int i = 0; i < R; ++i) {
    for (int u = 0; u < V; ++u) acc[i][u] = VecF{};
  }
  for (int64_t p = 0; p < kc; ++p) {
    VecF vp[V];
    for (int u = 0; u < V; ++u) {
      vp[u] = *reinterpret_cast<const VecF*>(v + u / 2 * panel_stride + u % 2 * kVecLen);
    }
    for (int i = 0; i < R; ++i) {
      const VecF si = broadcast(s(i, p));
      for (int u = 0; u < V; ++u) acc[i][u] = fmadd(si, vp[u], acc[i][u]);
    }
    v += kNR;
  }
  for (int i = 0; i < R; ++i) {
    VecF* row = reinterpret_cast<VecF*>(c + i * ldc);
    for (int u = 0; u < V; ++u) row[u] = accumulate ? row[u] + acc[i][u] : acc[i][u];
  }
}

// c[R x kNR] = (accumulate ? c : 0) + sum_p a[p, :R]^T b[p, :]: the first R rows of an A panel
// (kMR wide) against a B panel.
template <int R>
inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b,
                         float* __restrict c, int64_t ldc, bool accumulate) {
  micro_kernel_tile<R>(kc, [a](int i, int64_t p) { return a[p * kMR + i]; }, b, 0, c, ldc,
                       accumulate);
}

#if defined(__AVX512BF16__)
// With AVX512_BF16 a product of two bf16 operands runs on vdpbf16ps: A and B packed as pairs of
// bf16 along k (pack_bf16_pairs), each instruction two multiply-adds per lane into fp32 sums, at
// the instruction rate of an fp32 FMA (measured on Zen 4: 0.83-1.07x its time), so twice the
// work per instruction of widening to fp32 (fused fwd, M = 64 / 256: 0.42x / 0.49x the time).
// Products are exact; each pair's two products are added to the sum in fp32.
//
// micro_kernel over `pairs` bf16 pairs: a is pairs x kMR words (the first R rows used), b
// pairs x kNR words.
template <int R>
inline void micro_kernel_bf16(int64_t pairs, const uint32_t* __restrict a,
                              const uint32_t* __restrict b, float* __restrict c, int64_t ldc,
                              bool accumulate) {
  static_assert(kNR == 32, "two 16-lane vectors of B per pair");
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
    a += kMR;
    b += kNR;
  }
  for (int i = 0; i < R; ++i) {
    float* row = c + i * ldc;
    if (accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(row));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(row + 16));
    }
    _mm512_storeu_ps(row, acc[i][0]);
    _mm512_storeu_ps(row + 16, acc[i][1]);
  }
}
#endif

// out[r * ld + c] += (row r of a) . b[c] over n, for r < R, c < C: every row of A read once for
// C rows of B and every row of B once for R rows of A (R + C loads per R * C FMAs), and C rows of
// B in flight at once, which a single core needs to pull a weight at memory speed. B is read in
// its storage type and widened in registers (load_vec), so a half-precision weight streams at
// half the bytes of fp32. One vector accumulator per dot product, then its lanes, then the
// ragged end: an order fixed by n alone.
template <int R, int C, class TB>
inline void dot_block(const float* __restrict a, int64_t lda, const TB* const* b, int64_t n,
                      float* __restrict out, int64_t ld) {
  VecF s[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) s[r][c] = VecF{};
  }
  int64_t p = 0;
  for (; p + kVecLen <= n; p += kVecLen) {
    VecF av[R];
    for (int r = 0; r < R; ++r) av[r] = load_vec(a + r * lda + p);
    for (int c = 0; c < C; ++c) {
      prefetch_stream(b[c], p);
      const VecF bv = load_vec(b[c] + p);
      for (int r = 0; r < R; ++r) s[r][c] = fmadd(av[r], bv, s[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float total = 0.0f;
      for (int lane = 0; lane < kVecLen; ++lane) total += s[r][c][lane];
      for (int64_t q = p; q < n; ++q) total += a[r * lda + q] * to_float(b[c][q]);
      out[r * ld + c] += total;
    }
  }
}

// Vector registers the dot products' accumulators may take: 12 of the 16 of SSE / AVX2, 24 of
// AVX-512's 32 (the rest hold A's rows and a row of B).
inline constexpr int kDotAccumulators = kVecLen == 16 ? 24 : 12;
inline constexpr int kMaxDotCols = kDotAccumulators / 4 > 4 ? kDotAccumulators / 4 : 4;

template <class TB, int R, int... C>
constexpr auto dot_block_row(std::integer_sequence<int, C...>) {
  using Fn = void (*)(const float*, int64_t, const TB* const*, int64_t, float*, int64_t);
  return std::array<Fn, sizeof...(C)>{
      (R * (C + 1) <= kDotAccumulators ? &dot_block<R, C + 1, TB> : nullptr)...};
}

// dot_block for run-time R <= 4 and C <= kMaxDotCols, R * C <= kDotAccumulators.
template <class TB>
inline void dot_block_any(int rows, int cols, const float* a, int64_t lda, const TB* const* b,
                          int64_t n, float* out, int64_t ld) {
  using Cols = std::make_integer_sequence<int, kMaxDotCols>;
  static constexpr auto kTable =
      std::array{dot_block_row<TB, 1>(Cols{}), dot_block_row<TB, 2>(Cols{}),
                 dot_block_row<TB, 3>(Cols{}), dot_block_row<TB, 4>(Cols{})};
  kTable[rows - 1][cols - 1](a, lda, b, n, out, ld);
}

// One pass of scale_rows_into over columns [j, j + kVecs * kVecLen): the R rows of B at those
// columns into registers, applied to the m rows of sums.
template <int kVecs, int kR, class TB>
inline void scale_rows_columns(const float* __restrict a_rows, int64_t m, int64_t kc, int64_t p,
                               const TB* const (&b)[kR], float* __restrict acc, int64_t n,
                               int64_t j) {
  VecF bv[kR][kVecs];
#pragma GCC unroll 8
  for (int q = 0; q < kR; ++q) {
    for (int v = 0; v < kVecs; ++v) {
      prefetch_stream(b[q], j + v * kVecLen);
      bv[q][v] = load_vec(b[q] + j + v * kVecLen);
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    const float* a = a_rows + r * kc + p;
    VecF sum[kVecs];
    VecF f = broadcast(a[0]);
    for (int v = 0; v < kVecs; ++v) sum[v] = f * bv[0][v];
#pragma GCC unroll 8
    for (int q = 1; q < kR; ++q) {
      f = broadcast(a[q]);
      for (int v = 0; v < kVecs; ++v) sum[v] = fmadd(f, bv[q][v], sum[v]);
    }
    float* __restrict row = acc + r * n + j;
    for (int v = 0; v < kVecs; ++v) {
      store_vec(row + v * kVecLen, load_vec(row + v * kVecLen) + sum[v]);
    }
  }
}

// acc[r * n + j] += sum_q a_rows[r * kc + q] b_row(q)[j] over the kc rows of B, for r < m:
// kAlongJRowsPerPass (R) rows of B per pass over the sums, whose loads and stores are then 1/R
// of what they would be one row at a time. A pass takes two vectors of each of the R rows into
// registers and applies them to all m rows of sums before moving along j, so each element of B
// is loaded once however many rows there are (rows of B read start to end, as the prefetcher
// likes). b_row(q, slot) gives row q of the block as a TB pointer, `slot` (below R) naming
// scratch it may fill. Fixed order: rows of B in passes of R, then one at a time; within a
// pass, ((0 + 1) + 2) + ... + (R - 1), then added to the sum.
template <class TB, class RowOf>
inline void scale_rows_into(const float* __restrict a_rows, int64_t m, int64_t kc, RowOf b_row,
                            float* __restrict acc, int64_t n) {
  constexpr int kR = static_cast<int>(kAlongJRowsPerPass);
  int64_t p = 0;
  for (; p + kR <= kc; p += kR) {
    const TB* b[kR];
    for (int q = 0; q < kR; ++q) b[q] = b_row(p + q, q);
    int64_t j = 0;
    for (; j + 2 * kVecLen <= n; j += 2 * kVecLen) {
      scale_rows_columns<2, kR, TB>(a_rows, m, kc, p, b, acc, n, j);
    }
    // A narrow product (the adapter's rank as n) still runs on whole vectors.
    for (; j + kVecLen <= n; j += kVecLen) {
      scale_rows_columns<1, kR, TB>(a_rows, m, kc, p, b, acc, n, j);
    }
    for (int64_t r = 0; r < m; ++r) {
      const float* a = a_rows + r * kc + p;
      float* __restrict row = acc + r * n;
      for (int64_t col = j; col < n; ++col) {
        float sum = a[0] * to_float(b[0][col]);
#pragma GCC unroll 8
        for (int q = 1; q < kR; ++q) sum = fmadd(a[q], to_float(b[q][col]), sum);
        row[col] += sum;
      }
    }
  }
  for (; p < kc; ++p) {
    const TB* __restrict b_p = b_row(p, 0);
    for (int64_t r = 0; r < m; ++r) {
      const float a = a_rows[r * kc + p];
      float* __restrict row = acc + r * n;
      for (int64_t col = 0; col < n; ++col) row[col] += a * to_float(b_p[col]);
    }
  }
}

// c[R x V vectors] = (accumulate ? c : 0) + sum_p b_rows[i][p] a[p, :]: the micro-kernel with
// its broadcast operand read from R rows in place (B's columns, contiguous in k) and its vector
// operand V vectors of A's panels (kNR rows each, kc * kNR floats apart): the same products in
// the same order as micro_kernel, the operands' roles exchanged, so C^T comes out. Each
// broadcast element of B serves V multiply-adds, so the more vectors the fewer loads per
// multiply-add: R + V loads for R * V of them. gemm_tile_b_rows takes pairs of panels (V = 4,
// R = kMR / 2; against single panels, C ABI A/B on a 2-core Sapphire Rapids-class Xeon, fp32,
// 2026-12-06, fused fwd 0.97-1.00x at M = 64-128), then the rest as one group (b_rows_width).
template <int R, int V>
inline void micro_kernel_b_rows(int64_t kc, const float* const* b_rows,
                                const float* __restrict a, int64_t panel_stride,
                                float* __restrict c, int64_t ldc, bool accumulate) {
  const auto b_scalar = [b_rows](int i, int64_t p) { return b_rows[i][p]; };
  micro_kernel_tile<R, decltype(b_scalar), V>(kc, b_scalar, a, panel_stride, c, ldc, accumulate);
}

// Columns of B per micro_kernel_b_rows call for V vectors of A: the most that divide kMR (the
// columns gemm_tile_b_rows takes at a time) within 24 accumulators: kMR for one or two vectors,
// kMR / 2 for three or four (a pair of panels), 4 for five (20 accumulators; with the five A
// vectors and a broadcast, 26 of the 32 registers).
constexpr int b_rows_width(int vectors) {
  return vectors <= 2 ? static_cast<int>(kMR) : vectors <= 4 ? static_cast<int>(kMR / 2) : 4;
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_GEMM_KERNELS_H_
