#include "cpu/packed_gemm.h"

#include <algorithm>
#include <cstdlib>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora_ops::cpu {

namespace {

// One allocation per thread for the life of the thread: the kernels are called per layer and
// per step, and a fresh multi-100-KiB buffer each time would cost page faults on every call.
struct ThreadScratch {
  float* block = nullptr;
  bool tried = false;
  ~ThreadScratch() { std::free(block); }
};

constexpr int64_t kAPackFloats = kMC * kKC;
constexpr int64_t kBPackFloats = std::max(kKC * kMaxTileN, kBRowsPackFloats);

}  // namespace

GemmScratch thread_gemm_scratch() {
  static thread_local ThreadScratch scratch;
  if (!scratch.tried) {
    scratch.tried = true;
    const size_t bytes = sizeof(float) * (kAPackFloats + kBPackFloats + kCTileFloats);
    scratch.block = static_cast<float*>(std::aligned_alloc(64, bytes));
  }
  if (scratch.block == nullptr) return GemmScratch{nullptr, nullptr, nullptr};
  return GemmScratch{scratch.block, scratch.block + kAPackFloats,
                     scratch.block + kAPackFloats + kBPackFloats};
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

// Columns of the busiest thread's items when items of tile_m x tile_n (the last row and column
// of items ragged) are taken in order by the least-loaded thread, as dynamic scheduling does.
int64_t busiest_thread_work(int64_t m, int64_t n, int64_t tile_m, int64_t tile_n, int threads) {
  int64_t load[64] = {};
  const int slots = std::min(threads, 64);
  for (int64_t i0 = 0; i0 < m; i0 += tile_m) {
    for (int64_t j0 = 0; j0 < n; j0 += tile_n) {
      int64_t* idlest = std::min_element(load, load + slots);
      *idlest += std::min(tile_m, m - i0) * std::min(tile_n, n - j0);
    }
  }
  return *std::max_element(load, load + slots);
}

// The packed path's tile width: of the widths from the planned one down to a quarter of it (at
// least kNR), the one whose busiest thread has the least work, the widest on a tie (each column
// tile re-packs A). Rounding tiles to kNR otherwise leaves a narrow last tile, and a thread
// that ends its share early: 1024 columns in six tiles of 192 give the two threads 576 and 448.
int64_t balanced_tile_n(const TileGrid& grid, int64_t m, int64_t n, int threads) {
  int64_t best = grid.tile_n;
  int64_t best_work = busiest_thread_work(m, n, grid.tile_m, best, threads);
  for (int64_t tile_n = grid.tile_n - kNR; tile_n >= std::max(kNR, grid.tile_n / 4);
       tile_n -= kNR) {
    const int64_t work = busiest_thread_work(m, n, grid.tile_m, tile_n, threads);
    if (work < best_work) {
      best = tile_n;
      best_work = work;
    }
  }
  return best;
}

}  // namespace

TileGrid plan_tiles(int64_t m, int64_t n, int threads, bool streamed, bool b_rows) {
  if (streamed && m > kSmallM) {
    // A narrow product (streams_b; n <= kNarrowMaxN): work items of the decode path's kSmallM
    // rows, all columns in each.
    TileGrid grid;
    grid.tile_m = kSmallM;
    grid.tiles_m = ceil_div(m, kSmallM);
    grid.tile_n = n;
    grid.tiles_n = 1;
    return grid;
  }
  constexpr int64_t kMinTileN = 64;
  constexpr int64_t kMinTileM = 4 * kMR;
  int64_t tiles_n = ceil_div(n, b_rows ? b_rows_max_tile_n(m) : max_tile_n(streamed));
  int64_t tiles_m = ceil_div(m, kMaxTileM);
  if (streamed) {
    // Memory-bound: B is read in runs as long as the tiles are wide (short runs cost the
    // prefetcher its ramp-up each time), so as few column tiles as fit, the same number for
    // every thread. Three per thread took 1.6x the time of one in dY W at M = 8 (K = N = 4096
    // and 8192, fp32), and three tiles on two threads 1.3x that of four at M = 16, N = 14336.
    const int64_t workers = std::max(threads, 1);
    tiles_n = std::min(ceil_div(tiles_n, workers) * workers,
                       std::max<int64_t>(ceil_div(n, kMinTileN), 1));
    TileGrid grid;
    grid.tile_m = round_up(m, kMR);
    grid.tiles_m = 1;
    grid.tile_n = round_up(ceil_div(n, tiles_n), kNR);
    grid.tiles_n = ceil_div(n, grid.tile_n);
    return grid;
  }
  // Enough items to keep every thread busy with some balance, splitting columns first: a
  // narrower item only re-packs A (1/(2 tile_n) of its flops), a shorter one re-packs B.
  // With W read in place (b_rows) an item packs no B, only A (all m rows, the whole depth), so
  // fewer and wider ones: two per thread (a thread held up on a shared core still leaves work
  // to the others), up to the width its C^T fits in the C tile (b_rows_max_tile_n). Against
  // three per thread of at most kMaxTileN, fused fwd, fp32, C ABI A/B on a 2-core Xeon,
  // 2026-12-07, time new / old: 0.89 / 0.97 / 0.92 / 0.91 at M = 64 / 96 / 128 / 200 (K = 4096,
  // N = 1024); 0.96 / 0.94-1.02 / 0.97 / 0.95-1.02 / 0.96 / 1.00 at M = 24 / 32 / 40 / 64 / 96 /
  // 128 (K = N = 4096; two runs where a range); 0.94 at M = 48, N = 14336; 0.95 / 0.94 at
  // M = 64 / 128 with K = N = 2048 / 1024 (benchmarks/results/2026-12-07_cpu_xeon_b_rows_tiles.md).
  const int64_t wanted = threads > 1 ? (b_rows ? 2 : 3) * threads : 1;
  if (tiles_m * tiles_n < wanted) {
    tiles_n = std::max(tiles_n, std::min(ceil_div(wanted, tiles_m), ceil_div(n, kMinTileN)));
  }
  if (tiles_m * tiles_n < wanted) {
    tiles_m = std::max(tiles_m, std::min(ceil_div(wanted, tiles_n), ceil_div(m, kMinTileM)));
  }
  TileGrid grid;
  grid.tile_n = round_up(ceil_div(n, tiles_n), kNR);
  // A tile of kSmallM rows or fewer (a row split's last) takes the packed path, which holds
  // kMaxTileN columns. Only narrow products split rows (n < kMinTileN * wanted), so in practice
  // this cuts nothing.
  if (tiles_m > 1) grid.tile_n = std::min(grid.tile_n, kMaxTileN);
  grid.tile_m = round_up(ceil_div(m, tiles_m), kMR);
  grid.tiles_m = ceil_div(m, grid.tile_m);
  if (threads > 1) grid.tile_n = balanced_tile_n(grid, m, n, threads);
  grid.tiles_n = ceil_div(n, grid.tile_n);
  return grid;
}

}  // namespace lora_ops::cpu
