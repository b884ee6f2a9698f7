// The GEMM engine every CPU kernel runs on: C[i, j] = sum_k A(i, k) B(k, j), fp32 accumulation,
// for operands of any storage type and layout.
//
// Blocking follows the Goto/BLIS scheme: a work item owns a tile of C (at most kMaxTileM x
// kMaxTileN); for each depth block of kKC it packs its columns of B into fp32 panels of kNR
// columns and, kMC rows at a time, its rows of A into panels of kMR rows, then runs a register
// micro-kernel over panel pairs (the kernels are in gemm_kernels.h). Work items run in
// parallel (OpenMP), each with its own packed buffers, so no thread waits on another.
//
// The operands and the epilogue are template parameters, so the adapter work of a LoRA kernel
// (dropout, dtype conversion, gather of rows, scaling, bias, masks) happens while packing or
// while storing, never as a separate pass over memory:
//   pack_a.pack(float* dst, int64_t i, int64_t rows, int64_t k0, int64_t kc)
//       writes A(i .. i+rows-1, k0 .. k0+kc-1) as kc x kMR (k-major), rows >= `rows` zero;
//   pack_b.pack(float* dst, int64_t k0, int64_t kc, int64_t j0, int64_t n)
//       writes B(k0 .. k0+kc-1, j0 .. j0+n-1) as ceil(n / kNR) panels of kc x kNR (k-major),
//       panel q at dst + q * kNR * kc, columns past n zero;
//   epilogue.store(int64_t i, int64_t j0, const float* acc, int64_t n)
//       receives the finished sums C(i, j0 .. j0+n-1); an epilogue may instead take a work
//       item's whole tile at once (one that writes C transposed, say) through
//   epilogue.store_tile(int64_t i0, int64_t m, int64_t j0, int64_t n, const float* c,
//       int64_t ldc)   C(i0 + i, j0 + j) at c[i * ldc + j].
// With AVX512_BF16, two bf16 operands whose packs_bf16_pairs() hold are packed instead by
// pack_bf16_pairs (the same panels, each row a word holding a pair of bf16 along k) for a
// dot-product micro-kernel (Bf16PairPanels).
//
// A product of at most kSmallM rows (decode), or a narrow one (few columns: the shrink, see
// narrow_product), uses each element of B too few times to pay for packing it: when B's layout
// allows (streams_b), B is streamed in place instead, in its storage type (widened in
// registers), in long contiguous runs the hardware prefetcher follows (and prefetch_stream
// carries across pages), through
//   PackB::Element   B's storage type (float, Half, BFloat16);
//   pack_b.layout()  BLayout::kAlongK when B(., j) is contiguous in k and needs no
//       transformation, kAlongJ when B(k, .) is contiguous in j (the row-major matrices of the
//       kernels), kOther for anything else;
//   pack_b.along_k(int64_t j, int64_t k0)   a pointer to B(k0 .., j) (kAlongK);
//   pack_b.along_j_in_place()   whether kAlongJ rows may be read in place; if so
//   pack_b.along_j(int64_t k, int64_t j0)   is a pointer to B(k, j0 ..), else
//   pack_b.load_along_j(float* dst, int64_t k, int64_t j0, int64_t n)   writes them, as fp32;
//   pack_a.load_rows(float* dst, int64_t i, int64_t rows, int64_t k0, int64_t kc)
//       A(i .. i+rows-1, k0 .. k0+kc-1) as rows x kc, row-major.
// Which path runs depends on the product's shape and B's layout only, never on the thread
// count, and neither path's summation order depends on the tiling, so results are bitwise the
// same on any number of threads.
#ifndef LORA_OPS_CPU_PACKED_GEMM_H_
#define LORA_OPS_CPU_PACKED_GEMM_H_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/gemm_kernels.h"
#include "cpu/panel_transpose.h"
#include "cpu/phased_work.h"
#include "cpu/vec.h"
#include "lora_ops/common.h"
#include "lora_ops/kernels.h"

namespace lora_ops::cpu {

inline constexpr int64_t kKC = 256;        // depth of a packed block: a B panel stays in L1
inline constexpr int64_t kMC = 96;         // rows of A packed at once: the A block stays in L2
inline constexpr int64_t kMaxTileM = 384;  // rows of a work item, all sharing one packed B
inline constexpr int64_t kMaxTileN = 256;  // columns of a work item (packed B)
// A thread's C tile (GemmScratch::c_tile): a work item's C, or its C^T in gemm_tile_b_rows,
// whose items may be wider than kMaxTileN (b_rows_max_tile_n).
inline constexpr int64_t kCTileFloats = kMaxTileM * kMaxTileN;

inline constexpr int64_t kSmallM = kBuiltinGemmStreamRows;  // up to this many rows, B is streamed
// The streamed path fills the same scratch differently: depth blocks of few_rows_kc(m) (A's m
// rows in a_pack) and tiles up to kFewRowsMaxTileN wide, so that kAlongJRowsPerPass fp32 rows of
// B along j fit b_pack and kSmallM rows of sums fit c_tile.
inline constexpr int64_t kFewRowsMaxTileN =
    std::min(kKC * kMaxTileN / kAlongJRowsPerPass, kMaxTileM * kMaxTileN / kSmallM);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Packed-operand buffers and the fp32 C tile of the calling thread, sized for the largest work
// item, allocated on the thread's first use and kept. c_tile is null if allocation failed.
struct GemmScratch {
  float* a_pack;  // kMC x kKC
  float* b_pack;  // kKC x kMaxTileN, or kBRowsKC x kBRowsMaxM (gemm_tile_b_rows' A panels)
  float* c_tile;  // kCTileFloats: kMaxTileM x kMaxTileN, or C^T of a wider gemm_tile_b_rows tile
};
GemmScratch thread_gemm_scratch();

// Threads an OpenMP region of the kernels may use (1 without OpenMP).
int max_threads();

// Whether a product is big enough to pay for waking the thread team: about 2^19 multiply-adds,
// each output counted as 2 more (with sleeping waiters, OMP_WAIT_POLICY=PASSIVE, 2^17 made the
// one-row backward at K = N = 1024 take 1.4x longer: its adapter products each woke the team for
// a few microseconds of work; and counting an output as 16 threaded the depth-1 weight
// gradients of that backward: C ABI A/B against 16, bwd M = 1 / 4 at K = 4096, N = 1024 or 4096,
// fp32 0.82 / 0.96, bf16 0.89-0.91 / 0.87; fwd and M = 16 unchanged within the noise).
// worth_threads_for takes the sum of m * n * (k + 2) over several products.
inline bool worth_threads_for(int64_t work) {
  return max_threads() > 1 && work >= (int64_t{1} << 19);
}
inline bool worth_threads(int64_t m, int64_t n, int64_t k) {
  return worth_threads_for(m * n * (k + 2));
}

// Work-item tiling of an m x n product: tile_m rows by tile_n columns per item; `streamed` is
// streams_b() of the product.
struct TileGrid {
  int64_t tile_m, tile_n, tiles_m, tiles_n;
};
// `b_rows`: every tile of all m rows would read B in place (broadcasts_b_rows at m rows).
TileGrid plan_tiles(int64_t m, int64_t n, int threads, bool streamed, bool b_rows = false);

enum class BLayout { kAlongK, kAlongJ, kOther };

// Shallowest depth at which a streamed product takes dot products along k: each output ends in
// a reduction across a vector's lanes, which at the adapter's depth (its rank, in S B^T) cost
// more than the products. Shallower, B is packed (fused fwd at K = N = 4096, r = 16, M = 16:
// the adapter's share went from 0.43 to 0.09 ms in fp32; r = 128 measured alike either way).
inline constexpr int64_t kMinDotDepth = 8 * kVecLen;

// Whether the build has the bf16 dot-product micro-kernel (micro_kernel_bf16, AVX512_BF16).
#if defined(__AVX512BF16__) && !defined(__AVX512BW__)
#error "AVX512_BF16 without AVX512BW: the bf16 pair packing uses its 16-bit loads and shuffles"
#endif
#if defined(__AVX512BF16__)
inline constexpr bool kBf16DotProducts = true;
#else
inline constexpr bool kBf16DotProducts = false;
#endif

// Whether the packed path multiplies A and B as bf16 pairs (micro_kernel_bf16): both bf16, both
// read as stored (no dropout), A contiguous along k, B along k or along j.
template <class PackA, class PackB>
inline constexpr bool kBf16Operands = kBf16DotProducts &&
                                      std::is_same_v<typename PackA::Element, BFloat16> &&
                                      std::is_same_v<typename PackB::Element, BFloat16>;

template <class PackA, class PackB>
bool multiplies_bf16_pairs(const PackA& pack_a, const PackB& pack_b) {
  if constexpr (kBf16Operands<PackA, PackB>) {
    return pack_a.packs_bf16_pairs() && pack_b.packs_bf16_pairs();
  }
  return false;
}

// Most rows for which a bf16 product that multiplies_bf16_pairs streams B along k: packed pairs
// run at twice the multiply-adds per instruction of the streamed path, which widens to fp32.
// Measured on the fused fwd (C ABI), packed/streamed: 1.27 / 1.25 / 1.21 at M = 5 / 6 / 8,
// 0.82 / 0.92 / 0.99 / 0.85 at M = 9 / 10 / 12 / 16 (K = N = 4096), 0.70 at M = 12 with
// K = N = 1024 and 0.88 with N = 14336.
inline constexpr int64_t kBf16MaxStreamRows = 8;

// A narrow product: B stored along k and at most kNarrowMaxN columns, which streams_b streams at
// any number of rows, kSmallM rows per work item (plan_tiles). It is the adapter's shrink
// x A^T, n its rank: each element of A, packed into panels, would serve only n multiply-adds,
// and n short of a multiple of kNR leaves that share of the micro-kernel's lanes idle. The dot
// products load B in place instead; they win wherever the panels are part empty, and over full
// fp32 panels up to kNarrowFullPanelMaxRows rows. bf16 pairs run at twice the multiply-adds per
// instruction, so there only half a panel or less. AVX-512 only, the one vector unit measured:
// fused fwd, C ABI, K = 4096 and N = r (base GEMM as narrow as the shrink), new/old:
// - fp32, r = 16: 0.75 / 0.77 / 0.72 / 0.74 at M = 64 / 256 / 1024 / 4096; r = 8, M = 2048:
//   0.54; r = 48: 0.72 / 0.80 at M = 256 / 1024;
// - fp32, full panels: r = 32, 0.84 / 0.97 / 1.11 at M = 256 / 512 / 1024; r = 64, 0.80 /
//   0.96 / 1.0 at M = 256 / 512 / 1024;
// - bf16, r = 16: 0.68 / 0.74 / 0.77 at M = 256 / 1024 / 4096 (fp16 0.58 at 256); full panels
//   1.17 / 1.18 (r = 64, M = 256; r = 32, M = 512).
inline constexpr int64_t kNarrowMaxN = 64;
inline constexpr int64_t kNarrowFullPanelMaxRows = 512;

template <class PackA, class PackB>
bool narrow_product(int64_t m, int64_t n, const PackA& pack_a, const PackB& pack_b) {
  if (kVecLen != 16 || pack_b.layout() != BLayout::kAlongK || n > kNarrowMaxN) return false;
  if (multiplies_bf16_pairs(pack_a, pack_b)) return n <= kNR / 2;
  return n % kNR != 0 || m <= kNarrowFullPanelMaxRows;
}

// Whether an m x n product of depth k streams B rather than packing it (see the top of this
// file).
template <class PackA, class PackB>
bool streams_b(int64_t m, int64_t n, int64_t k, const PackA& pack_a, const PackB& pack_b) {
  const bool narrow = narrow_product(m, n, pack_a, pack_b);
  if (m > kSmallM && !narrow) return false;
  switch (pack_b.layout()) {
    case BLayout::kAlongK:
      if (m > kBf16MaxStreamRows && !narrow && multiplies_bf16_pairs(pack_a, pack_b)) {
        return false;
      }
      return k >= kMinDotDepth;
    case BLayout::kAlongJ:
      // Every such product: scale_rows_into loads each element of B once per pass over all the
      // rows of sums. Measured on the fused backward (its dY W, C ABI), r = 16, against packing
      // B for the micro-kernel from 9 rows (fp32 and fp16) or 5 (bf16 pairs): fp32 0.84 / 0.74
      // at M = 12 / 16 (K = N = 4096), 0.93 at M = 16 with K = N = 1024, 0.81 with N = 14336;
      // bf16 0.51 / 0.58 at M = 8 / 16, 0.81 at M = 16 with K = N = 1024; fp16 0.72 / 0.74 at
      // M = 8 / 16, 1.09 at M = 16 with K = N = 1024.
      return true;
    case BLayout::kOther:
      break;
  }
  return false;
}

// Most rows of a tile that gemm_tile_b_rows takes. Fused fwd, C ABI, fp32, against packing B
// (depth blocks of 256 then, Xeon): 0.90 / 0.87 / 0.96 / 1.05 at M = 24 (K = N = 4096) / 64 /
// 128 (K = N = 2048) / 256 (K = 4096, N = 1024). With long runs (kBRowsKC, b_rows_depth), from
// 128 to 256 rows: C ABI A/B on a 2-core AMD EPYC (AVX-512), 2026-12-06, fused fwd time at 256
// / at 128: 0.86 / 0.88 at M = 256 / 192 (K = 4096, N = 1024), 0.90 at M = 256 (K = N = 2048),
// 0.89 at M = 160 (K = N = 4096); 1.00 at M = 96, 384, 512 and 1024 (tiles unchanged). On a
// Xeon the torch ops take MKL above 128 rows (kMklIntelMaxRows): there this path took 0.85-1.16x
// MKL's time at 129-256 rows (builtin_gemm.cpp).
inline constexpr int64_t kBRowsMaxM = 256;
// Depth of gemm_tile_b_rows' blocks: each row of B (W's rows, read in place) is read in runs of
// this many elements before the next group of rows; runs of 256 (kKC) left the hardware
// prefetcher short streams to ramp up on. C ABI A/B, fused fwd, fp32, weights rotated through
// 24 copies, 2-core Sapphire Rapids-class Xeon, 2026-12-06, time at 2048 / at 256: 0.74 / 0.83 /
// 0.83 / 0.97 at M = 32 (K = N = 4096) / 64 (4096) / 64 (2048) / 128 (2048); 0.74 at M = 24,
// K = 14336, N = 4096; 0.89 / 0.96 at M = 48 / 96 (K = 4096, N = 1024); 1024 was between the
// two. The sums still go by blocks of kKC (the micro-kernel is called per kKC of the run, within
// 2% of one call per run), so they round as the packed path's do: a tile's rows, and so its
// path, can depend on the thread count, and the results must not. A's panels of a block,
// kBRowsKC x up to kBRowsMaxM, fill b_pack (1 MiB).
inline constexpr int64_t kBRowsKC = 2048;
// The scratch for a block's A panels (b_pack's share): kBRowsKC deep at up to 128 rows.
inline constexpr int64_t kBRowsPackFloats = kBRowsKC * 128;

// Depth of a tile's blocks: kBRowsKC, halved while its A panels (m_pad rows) would overflow
// the scratch, so 1024 at 129-256 rows.
inline int64_t b_rows_depth(int64_t m_pad) {
  int64_t kc = kBRowsKC;
  while (kc > kKC && kc * m_pad > kBRowsPackFloats) kc /= 2;
  return kc;
}

// Whether a packed product reads B's columns in place as the micro-kernel's broadcast operand
// (gemm_tile_b_rows) instead of transposing them into panels: AVX-512, fp32 B stored along k
// (a weight [N, K] in x W^T) as read, more rows than the streamed path takes and at most
// kBRowsMaxM. With few rows each element of B serves few multiply-adds, so its transpose into
// panels was a large share of the product (M = 64, K = N = 2048: 25% of the GEMM's time), while
// A, the operand packed instead, is the small one there.
template <class PackB>
inline constexpr bool kBRowsOperands =
    kVecLen == 16 && std::is_same_v<typename PackB::Element, float>;

template <class PackA, class PackB>
bool broadcasts_b_rows(int64_t m, const PackA& pack_a, const PackB& pack_b) {
  (void)pack_a;
  if constexpr (kBRowsOperands<PackB>) {
    return m > kSmallM && m <= kBRowsMaxM && pack_b.layout() == BLayout::kAlongK;
  }
  return false;
}

// The widest tile of m rows that gemm_tile_b_rows takes: its C^T, n rounded up to kMR by m
// rounded up to kNR, fills the thread's C tile (768 columns at 128 rows, 384 at 256).
inline int64_t b_rows_max_tile_n(int64_t m) {
  const int64_t fits = kCTileFloats / round_up(m, kNR) / kMR * kMR;  // n_pad <= fits if n <= fits
  return fits / kNR * kNR;
}

template <class Epilogue, class = void>
struct StoresTiles : std::false_type {};
template <class Epilogue>
struct StoresTiles<Epilogue, std::void_t<decltype(std::declval<const Epilogue&>().store_tile(
                                 int64_t{}, int64_t{}, int64_t{}, int64_t{},
                                 static_cast<const float*>(nullptr), int64_t{}))>>
    : std::true_type {};

// Hands a finished tile (C(i0 + i, j0 + j) at c[i * ldc + j]) to the epilogue.
template <class Epilogue>
void store_c_tile(const Epilogue& epilogue, int64_t i0, int64_t m, int64_t j0, int64_t n,
                  const float* c, int64_t ldc) {
  if constexpr (StoresTiles<Epilogue>::value) {
    epilogue.store_tile(i0, m, j0, n, c, ldc);
  } else {
    for (int64_t i = 0; i < m; ++i) epilogue.store(i0 + i, j0, c + i * ldc, n);
  }
}

inline int64_t max_tile_n(bool streamed) { return streamed ? kFewRowsMaxTileN : kMaxTileN; }

// Depth of one streamed block for m rows: as deep as a_pack holds, so that for a few rows a row
// of B is read start to end in one run and consecutive rows of B form long streams (blocks
// shallower than a row would read B in strided pieces, measurably slower).
inline int64_t few_rows_kc(int64_t m) {
  const int64_t kc = kMC * kKC / (m > 0 ? m : 1);
  return kc / (2 * kVecLen) * (2 * kVecLen);
}

// The tile of a product that streams B: dot products along k, or rows of B scaled into the
// sums; m <= kSmallM, n <= kFewRowsMaxTileN. B is read in place in its storage type unless it
// needs a transformation (dropout), which goes through fp32 rows in b_pack.
template <class PackA, class PackB, class Epilogue>
void gemm_tile_few_rows(const PackA& pack_a, const PackB& pack_b, const Epilogue& epilogue,
                        int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t k,
                        const GemmScratch& ws) {
  using TB = typename PackB::Element;
  float* __restrict acc = ws.c_tile;     // m x n
  float* __restrict a_rows = ws.a_pack;  // m x kc
  float* __restrict b_lines = ws.b_pack;  // kAlongJRowsPerPass rows of B along j, as fp32,
                                          // when transformed
  std::fill(acc, acc + m * n, 0.0f);
  const bool along_k = pack_b.layout() == BLayout::kAlongK;
  // Rows of B along j are loaded once per pass over all rows of A (scale_rows_into), so they are
  // widened in registers wherever they may be read in place (fp16 dY W, K = N = 4096, against
  // widening once into fp32 lines: 0.81 / 0.78 of the time at M = 5 / 8).
  const bool in_place = pack_b.along_j_in_place();
  const int64_t kc_max = few_rows_kc(m);
  for (int64_t k0 = 0; k0 < k; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, k - k0);
    pack_a.load_rows(a_rows, i0, m, k0, kc);
    if (along_k) {
      // Up to three rows of A: kMaxDotCols rows of B at a time (4, or 6 with AVX-512: more
      // streams in flight); more rows: as many as four rows of A leave accumulators for (3, or 6
      // with AVX-512), so that A, re-read from L2 on every pass over its rows, costs fewer loads
      // per multiply-add.
      const int64_t cols_per_pass = m <= 3 ? kMaxDotCols : kDotAccumulators / 4;
      for (int64_t j = 0; j < n; j += cols_per_pass) {
        const int cols = static_cast<int>(std::min(cols_per_pass, n - j));
        const TB* b_rows[kMaxDotCols];
        for (int c = 0; c < cols; ++c) b_rows[c] = pack_b.along_k(j0 + j + c, k0);
        for (int64_t r = 0; r < m; r += 4) {
          const int rows = static_cast<int>(std::min<int64_t>(4, m - r));
          dot_block_any(rows, cols, a_rows + r * kc, kc, b_rows, kc, acc + r * n + j, n);
        }
      }
    } else if (in_place) {
      const auto b_row = [&](int64_t p, int) { return pack_b.along_j(k0 + p, j0); };
      scale_rows_into<TB>(a_rows, m, kc, b_row, acc, n);
    } else {
      const auto b_row = [&](int64_t p, int slot) {
        float* line = b_lines + slot * n;
        pack_b.load_along_j(line, k0 + p, j0, n);
        return static_cast<const float*>(line);
      };
      scale_rows_into<float>(a_rows, m, kc, b_row, acc, n);
    }
  }
  store_c_tile(epilogue, i0, m, j0, n, acc, n);
}

// A panel of `count` rows of A (at most kMR) through the full micro-kernel, or through the
// half-height one when count fits it: a ragged last panel (M = 16 is one full panel and 4 rows)
// does half the FMAs of a full one. Only the rows computed are written to c.
inline constexpr int kHalfMR = static_cast<int>(kMR / 2);
template <auto kFull, auto kHalf, class Word>
inline void multiply_rows(int64_t rows, const Word* a, const Word* b, float* c, int64_t ldc,
                          bool accumulate, int64_t count) {
  if (count <= kHalfMR) {
    kHalf(rows, a, b, c, ldc, accumulate);
  } else {
    kFull(rows, a, b, c, ldc, accumulate);
  }
}

// The panels of the packed path: fp32 elements along k for micro_kernel, and (AVX512_BF16)
// words of bf16 pairs along k for micro_kernel_bf16. Each gives the depth of a block in elements
// of k, the rows of a panel for kc of them, the operands' packing and the micro-kernel.
struct Fp32Panels {
  using Word = float;
  static constexpr int64_t kDepth = kKC;
  static int64_t rows(int64_t kc) { return kc; }
  template <class PackA>
  static void pack_a(const PackA& op, Word* dst, int64_t i, int64_t count, int64_t k0,
                     int64_t kc) {
    op.pack(dst, i, count, k0, kc);
  }
  template <class PackB>
  static void pack_b(const PackB& op, Word* dst, int64_t k0, int64_t kc, int64_t j0, int64_t n) {
    op.pack(dst, k0, kc, j0, n);
  }
  static void multiply(int64_t rows, const Word* a, const Word* b, float* c, int64_t ldc,
                       bool accumulate, int64_t count) {
    multiply_rows<micro_kernel<kMR>, micro_kernel<kHalfMR>>(rows, a, b, c, ldc, accumulate, count);
  }
};

#if defined(__AVX512BF16__)
// A block is 2 kKC elements, kKC pairs: as many words as an fp32 block, so the same scratch
// (fused fwd bf16, new/old against kKC elements: 0.885 / 0.925 / 0.924 at M = 16 / 64 / 256;
// bwd 1.04 / 1.00 at M = 16 / 256).
struct Bf16PairPanels {
  using Word = uint32_t;
  static constexpr int64_t kDepth = 2 * kKC;
  static int64_t rows(int64_t kc) { return ceil_div(kc, 2); }
  template <class PackA>
  static void pack_a(const PackA& op, Word* dst, int64_t i, int64_t count, int64_t k0,
                     int64_t kc) {
    op.pack_bf16_pairs(dst, i, count, k0, kc);
  }
  template <class PackB>
  static void pack_b(const PackB& op, Word* dst, int64_t k0, int64_t kc, int64_t j0, int64_t n) {
    op.pack_bf16_pairs(dst, k0, kc, j0, n);
  }
  static void multiply(int64_t rows, const Word* a, const Word* b, float* c, int64_t ldc,
                       bool accumulate, int64_t count) {
    multiply_rows<micro_kernel_bf16<kMR>, micro_kernel_bf16<kHalfMR>>(rows, a, b, c, ldc,
                                                                       accumulate, count);
  }
};
#endif

// The packed path of gemm_tile in one panel format: for each depth block, B's columns packed
// once, then kMC rows of A at a time, the micro-kernel over every pair of panels.
template <class Panels, class PackA, class PackB, class Epilogue>
void gemm_tile_packed(const PackA& pack_a, const PackB& pack_b, const Epilogue& epilogue,
                      int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t k,
                      const GemmScratch& ws) {
  using Word = typename Panels::Word;
  Word* a_pack = reinterpret_cast<Word*>(ws.a_pack);
  Word* b_pack = reinterpret_cast<Word*>(ws.b_pack);
  const int64_t n_pad = round_up(n, kNR);
  if (k == 0) std::fill(ws.c_tile, ws.c_tile + round_up(m, kMR) * n_pad, 0.0f);
  for (int64_t k0 = 0; k0 < k; k0 += Panels::kDepth) {
    const int64_t kc = std::min(Panels::kDepth, k - k0);
    const int64_t rows = Panels::rows(kc);
    Panels::pack_b(pack_b, b_pack, k0, kc, j0, n);
    for (int64_t ic = 0; ic < m; ic += kMC) {
      const int64_t mc = std::min(kMC, m - ic);
      for (int64_t ip = 0; ip < mc; ip += kMR) {
        Panels::pack_a(pack_a, a_pack + ip * rows, i0 + ic + ip, std::min(kMR, mc - ip), k0, kc);
      }
      for (int64_t jp = 0; jp < n; jp += kNR) {
        for (int64_t ip = 0; ip < mc; ip += kMR) {
          Panels::multiply(rows, a_pack + ip * rows, b_pack + jp * rows,
                           ws.c_tile + (ic + ip) * n_pad + jp, n_pad, k0 > 0,
                           std::min(kMR, mc - ip));
        }
      }
    }
  }
  store_c_tile(epilogue, i0, m, j0, n, ws.c_tile, n_pad);
}

// Columns h .. h + R - 1 (R = b_rows_width(V)) of the kMR whose rows of B from depth k0 are
// b_rows, against V vectors of A from `a` (panels of kc x kNR), into C^T at c (row stride ldc):
// the depth in calls of kKC, at half width when at most R / 2 of the `count` columns are left.
template <int V>
void b_rows_chunk(int64_t h, int64_t count, const float* const* b_rows, const float* a,
                  int64_t kc, int64_t k0, float* c, int64_t ldc) {
  constexpr int R = b_rows_width(V);
  const bool half = count - h <= R / 2;
  for (int64_t p = 0; p < kc; p += kKC) {
    const float* rows[R];
    for (int i = 0; i < R; ++i) rows[i] = b_rows[h + i] + p;
    const int64_t depth = std::min(kKC, kc - p);
    const bool accumulate = k0 + p > 0;
    if (half) {
      micro_kernel_b_rows<R / 2, V>(depth, rows, a + p * kNR, kc * kNR, c + h * ldc, ldc,
                                    accumulate);
    } else {
      micro_kernel_b_rows<R, V>(depth, rows, a + p * kNR, kc * kNR, c + h * ldc, ldc,
                                accumulate);
    }
  }
}

// How gemm_tile_b_rows groups a tile's m rows, as vectors of A (kVecLen rows): pairs of panels
// (4 vectors) from row 0, then one group of the 1-3 vectors left, or of 5 where a single one is
// left after a pair. Alone, a last vector does one multiply-add per load of B: it took about
// twice its share of the time. C ABI A/B against a lone last vector (one panel of one or two
// vectors after the pairs), fused fwd fp32, weights rotated through 6 copies, 2-core Sapphire
// Rapids-class Xeon, 2026-12-07, new/old: 0.90 / 0.94 / 0.95 / 0.97 / 0.97 at M = 48 / 80 /
// 100 / 112 / 144 (K = 4096, N = 1024), 0.86 / 0.95 at M = 40 / 80 (K = N = 4096); 1.02 at
// M = 64 (one pair either way).
struct BRowsGroups {
  using Chunk = void (*)(int64_t, int64_t, const float* const*, const float*, int64_t, int64_t,
                         float*, int64_t);
  int64_t tail, paired;  // vectors in the last group; rows in pairs (a multiple of 2 kNR)

  explicit BRowsGroups(int64_t m) {
    const int64_t vectors = ceil_div(m, kVecLen);
    tail = vectors > 4 && vectors % 4 == 1 ? 5 : vectors % 4;
    paired = (vectors - tail) * kVecLen;
  }
  int tail_width() const { return b_rows_width(static_cast<int>(tail)); }
  Chunk tail_chunk() const {
    constexpr Chunk kChunks[] = {nullptr, &b_rows_chunk<1>, &b_rows_chunk<2>, &b_rows_chunk<3>,
                                 nullptr, &b_rows_chunk<5>};
    return kChunks[tail];
  }
};

// The tile of a product that broadcasts_b_rows: for each depth block, the tile's rows of A
// packed once as panels of kNR rows (into b_pack), then kMR columns of B at a time read in place
// against every panel, into C^T (c_tile, n rounded up to kMR rows of m rounded up to kNR); then
// C^T's columns handed to the epilogue as rows of C, a_pack holding a slab at a time.
// m <= kBRowsMaxM, n <= b_rows_max_tile_n(m).
template <class PackA, class PackB, class Epilogue>
void gemm_tile_b_rows(const PackA& pack_a, const PackB& pack_b, const Epilogue& epilogue,
                      int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t k,
                      const GemmScratch& ws) {
  const int64_t m_pad = round_up(m, kNR);
  const int64_t n_pad = round_up(n, kMR);
  float* __restrict ct = ws.c_tile;  // C^T: n_pad x m_pad
  if (k == 0) std::fill(ct, ct + n_pad * m_pad, 0.0f);
  const int64_t depth = b_rows_depth(m_pad);
  const BRowsGroups groups(m);
  for (int64_t k0 = 0; k0 < k; k0 += depth) {
    const int64_t kc = std::min(depth, k - k0);
    for (int64_t ip = 0; ip < m; ip += kNR) {
      pack_a.pack(ws.b_pack + ip * kc, i0 + ip, std::min(kNR, m - ip), k0, kc, kNR);
    }
    for (int64_t jp = 0; jp < n; jp += kMR) {
      const int64_t count = std::min(kMR, n - jp);
      const float* b_rows[kMR];
      // Columns past n repeat the last one: computed into C^T's padding rows, never stored.
      for (int64_t c = 0; c < kMR; ++c) {
        b_rows[c] = pack_b.along_k(j0 + jp + std::min(c, count - 1), k0);
      }
      // Pairs of panels by halves of the kMR columns, then the last group of vectors. Each call
      // covers kKC of depth: every sum is then rounded as the packed path rounds it (block sums
      // of kKC added in order), which a tile may take instead of this one (its rows, and so
      // its path, can depend on the thread count), while B's rows are still read in runs of kc.
      float* c = ct + jp * m_pad;
      for (int64_t h = 0; h < count; h += kHalfMR) {
        for (int64_t ip = 0; ip < groups.paired; ip += 2 * kNR) {
          b_rows_chunk<4>(h, count, b_rows, ws.b_pack + ip * kc, kc, k0, c + ip, m_pad);
        }
      }
      if (groups.tail > 0) {
        const float* a = ws.b_pack + groups.paired * kc;
        const int width = groups.tail_width();
        for (int64_t h = 0; h < count; h += width) {
          groups.tail_chunk()(h, count, b_rows, a, kc, k0, c + groups.paired, m_pad);
        }
      }
    }
  }
  const int64_t slab = std::max<int64_t>(1, kMC * kKC / n);  // rows of C per pass through a_pack
  for (int64_t i = 0; i < m; i += slab) {
    const int64_t rows = std::min(slab, m - i);
    transpose_block(ws.a_pack, n, ct + i, m_pad, n, rows);
    store_c_tile(epilogue, i0 + i, rows, j0, n, ws.a_pack, n);
  }
}

// C(i0 .. i0+m-1, j0 .. j0+n-1) over the full depth k, on the calling thread; `streamed` is
// streams_b() of the whole product; m <= kMaxTileM and n <= max_tile_n(streamed), or
// n <= b_rows_max_tile_n(m) where broadcasts_b_rows. False if the thread's scratch could not
// be allocated.
template <class PackA, class PackB, class Epilogue>
bool gemm_tile(const PackA& pack_a, const PackB& pack_b, const Epilogue& epilogue, int64_t i0,
               int64_t m, int64_t j0, int64_t n, int64_t k, bool streamed) {
  const GemmScratch ws = thread_gemm_scratch();
  if (ws.c_tile == nullptr) return false;
  if (streamed) {
    gemm_tile_few_rows(pack_a, pack_b, epilogue, i0, m, j0, n, k, ws);
    return true;
  }
  if constexpr (kBRowsOperands<PackB>) {
    if (broadcasts_b_rows(m, pack_a, pack_b) && n <= b_rows_max_tile_n(m)) {
      gemm_tile_b_rows(pack_a, pack_b, epilogue, i0, m, j0, n, k, ws);
      return true;
    }
  }
#if defined(__AVX512BF16__)
  if constexpr (kBf16Operands<PackA, PackB>) {
    if (multiplies_bf16_pairs(pack_a, pack_b)) {
      gemm_tile_packed<Bf16PairPanels>(pack_a, pack_b, epilogue, i0, m, j0, n, k, ws);
      return true;
    }
  }
#endif
  gemm_tile_packed<Fp32Panels>(pack_a, pack_b, epilogue, i0, m, j0, n, k, ws);
  return true;
}

// The work items of the whole m x n product, planned for the thread team when the product is
// worth waking it (worth_threads), else as one thread's: a phase of a PhasedWork.
template <class PackA, class PackB, class Epilogue>
struct GemmTiles {
  PackA pack_a;
  PackB pack_b;
  Epilogue epilogue;
  int64_t m, n, k;
  bool threaded, streamed;
  TileGrid grid;

  int64_t items() const { return m > 0 && n > 0 ? grid.tiles_m * grid.tiles_n : 0; }
  bool operator()(int64_t item) const {
    const int64_t i0 = item / grid.tiles_n * grid.tile_m;
    const int64_t j0 = item % grid.tiles_n * grid.tile_n;
    return gemm_tile(pack_a, pack_b, epilogue, i0, std::min(grid.tile_m, m - i0), j0,
                     std::min(grid.tile_n, n - j0), k, streamed);
  }
};

template <class PackA, class PackB, class Epilogue>
GemmTiles<PackA, PackB, Epilogue> plan_gemm(const PackA& pack_a, const PackB& pack_b,
                                            const Epilogue& epilogue, int64_t m, int64_t n,
                                            int64_t k) {
  const bool threaded = m > 0 && n > 0 && worth_threads(m, n, k);
  const bool streamed = m > 0 && n > 0 && streams_b(m, n, k, pack_a, pack_b);
  const bool b_rows = !streamed && broadcasts_b_rows(m, pack_a, pack_b);
  const TileGrid grid = m > 0 && n > 0
                            ? plan_tiles(m, n, threaded ? max_threads() : 1, streamed, b_rows)
                            : TileGrid{};
  return GemmTiles<PackA, PackB, Epilogue>{pack_a, pack_b, epilogue, m, n, k,
                                           threaded, streamed, grid};
}

// Appends the product's tiles to `work` as a phase; whether it wants the thread team.
template <class Tiles>
bool add_phase(PhasedWork& work, const Tiles& tiles) {
  work.add(tiles.items(), tiles);
  return tiles.threaded;
}

// Runs the items of one phase alone. LORA_ERR_UNSUPPORTED if a thread's GEMM scratch could not
// be allocated (the only way a tile fails).
template <class Tiles>
lora_status_t run_phase(const Tiles& tiles) {
  PhasedWork work;
  const bool threaded = add_phase(work, tiles);
  return work.run(threaded) ? LORA_OK : LORA_ERR_UNSUPPORTED;
}

// The whole m x n product, work items spread over the threads.
template <class PackA, class PackB, class Epilogue>
lora_status_t parallel_gemm(const PackA& pack_a, const PackB& pack_b, const Epilogue& epilogue,
                            int64_t m, int64_t n, int64_t k) {
  return run_phase(plan_gemm(pack_a, pack_b, epilogue, m, n, k));
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_PACKED_GEMM_H_
