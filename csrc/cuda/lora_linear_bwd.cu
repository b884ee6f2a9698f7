// Single-adapter LoRA linear backward on CUDA (math in kernels.h; W frozen, no dW):
//   dS = scaling dY B (fp32)   dB = scaling dY^T S   dA = dS^T drop(x)
//   dX = dY W + keep_scale mask (dS A)
// in three launches, every reduction in a fixed order (bitwise reproducible):
//  1. over dY: dS as `ds_splits` partial sums over N, and dB as `db_splits` partial sums over M
//     (two kinds of blocks in one grid); block 0 also zeroes the dA tile counters of launch 2.
//  2. dx_init = keep_scale mask (dS A) over an (M, K) tile grid; dA partial sums over M, each
//     tile finished by the last of its blocks to arrive (counter + fence), adding the partials
//     in split order; dB = sum of its partials, converted to dtype. dS is read as the sum of its
//     partials wherever it is used.
//  3. cuBLAS dX = dY W + dx_init (beta = 1).
// On Hopper without dropout, where the shape qualifies (adapter_gemm.cuh), launch 2 stores dS
// rounded to dtype instead of dx_init, and launch 3 is the adapter-in-GEMM kernel computing
// dX = dY W + dS A as one GEMM N + r deep: no dx_init round trip (2 M K e bytes). With dropout
// the mask applies to dS A alone, so that term cannot join dY W's accumulators.
// Splitting the reductions (over N for dS, over M for dB and dA) keeps enough blocks in flight
// when M, N or r is small; the split counts come from the shape alone, so a shape always gets
// the same plan and the same bits. Any of dx, dA, dB may be NULL: its work is skipped.
// The products run on tensor-core tiles for fp16 / bf16 (mma_tile.cuh: dS, an fp32 sum, is then
// rounded to dtype where it is an operand of dx and dA, as eager PyTorch rounds it), on SIMT
// tiles for fp32 or with LORA_OPS_CUDA_MMA=0.
#include <stdint.h>

#include "adapter_gemm.cuh"
#include "common.cuh"
#include "dtype.cuh"
#include "launchers.cuh"
#include "lora_ops/kernels.h"
#include "mma_tile.cuh"
#include "tile_gemm.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

constexpr int kMaxSplits = 8;
constexpr int kFinishPerBlock = 4 * kThreads;  // dB elements finished per block

struct Split {
  int count;
  int64_t len;  // depth per split, a multiple of the tile depth
};

// Splits of a reduction of `depth` feeding `tiles` output tiles: enough blocks to fill the GPU,
// at most kMaxSplits, at least 256 deep each.
Split plan_split(int64_t depth, int64_t tiles) {
  const int64_t max_splits = clamp64(ceil_div(depth, 256), 1, kMaxSplits);
  int64_t count = clamp64(ceil_div(kTargetBlocks, tiles > 0 ? tiles : 1), 1, max_splits);
  int64_t len = round_up(ceil_div(depth, count), WideTile::BK);
  if (len == 0) len = WideTile::BK;
  count = clamp64(ceil_div(depth, len), 1, max_splits);
  return Split{static_cast<int>(count), len};
}

struct BwdPlan {
  bool thin;  // r <= 16: tiles with a rank side of 16
  int64_t row_tiles, n_tiles, k_tiles, r_tiles;
  Split ds_split, db_split, da_split;
  float* ds_part;     // [ds_split.count, M, r]
  float* db_part;     // [db_split.count, N, r]
  float* da_part;     // [da_split.count, K, r]
  int32_t* counters;  // [k_tiles * r_tiles]
  void* ds_round;     // where the adapter-in-GEMM plan may run: dS in dtype, [M, ld_s]
  size_t workspace_bytes;
};

// Rows, columns of dY and columns of x are tiled by 64 here and in the kernels below (dx_init,
// ds_round_rows): the row side of every tile type.
static_assert(WideTile::BM == 64 && ThinTile::BM == 64, "the backward's tiles are 64 rows");

BwdPlan plan_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                 void* workspace) {
  BwdPlan plan{};
  plan.thin = r <= ThinTile::BN;
  plan.row_tiles = ceil_div(M, 64);
  plan.n_tiles = ceil_div(N, 64);
  plan.k_tiles = ceil_div(K, 64);
  plan.r_tiles = ceil_div(r, plan.thin ? ThinTile::BN : WideTile::BN);
  plan.ds_split = plan_split(N, plan.row_tiles * plan.r_tiles);
  plan.db_split = plan_split(M, plan.n_tiles * plan.r_tiles);
  plan.da_split = plan_split(M, plan.k_tiles * plan.r_tiles);
  WorkspaceLayout ws(workspace);
  plan.ds_part = ws.take<float>(static_cast<size_t>(plan.ds_split.count * M * r));
  plan.db_part = ws.take<float>(static_cast<size_t>(plan.db_split.count * N * r));
  plan.da_part = ws.take<float>(static_cast<size_t>(plan.da_split.count * K * r));
  plan.counters = ws.take<int32_t>(static_cast<size_t>(plan.k_tiles * plan.r_tiles));
  if (adapter_gemm_shape_ok(dtype, M, /*out=*/K, /*depth=*/N, r)) {
    const int64_t bytes = M * adapter_gemm_ld_s(r) * dtype_size(dtype);
    plan.ds_round = ws.take<char>(static_cast<size_t>(bytes));
  }
  plan.workspace_bytes = ws.bytes();
  return plan;
}

struct BwdArgs {
  int64_t M, N, K, r;
  const void* dy;
  const void* x;
  int64_t ldx;
  const void* a;
  const void* b;
  const void* s;
  float scaling;
  lora_dropout_t dropout;
  void* dx;
  void* da;
  void* db;
  float* ds_part;
  float* db_part;
  float* da_part;
  int32_t* counters;
  int64_t num_counters;
  void* ds_round;  // adapter-in-GEMM plan: launch 2 stores dS here instead of dx_init
  int64_t ld_ds_round;
  Split ds_split, db_split, da_split;
  unsigned ds_blocks, db_blocks;                 // launch 1
  unsigned dx_blocks, da_blocks, db_fin_blocks;  // launch 2
};

// The tile's acc(i, j) as out[(i0 + row) * ld + j0 + col] = scale * acc for rows < rows and
// cols < cols.
template <class Tl>
__device__ __forceinline__ void store_partial(float* out, int64_t ld, int64_t i0, int64_t rows,
                                              int64_t j0, int64_t cols, float scale,
                                              const float (&acc)[Tl::TM * Tl::TN]) {
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const int64_t row = i0 + Tl::row_of(i);
#pragma unroll
    for (int j = 0; j < Tl::TN; ++j) {
      const int64_t col = j0 + Tl::col_of(j);
      if (row < rows && col < cols) out[row * ld + col] = scale * acc[i * Tl::TN + j];
    }
  }
}

// Launch 1. Blocks [0, ds_blocks): (row tile, rank tile, split of N) of dS = scaling dY B.
// Blocks after: (column tile of dY, rank tile, split of M) of dB = scaling dY^T S.
template <typename T, class Tl>
__global__ void __launch_bounds__(kThreads, 2) bwd_dy_kernel(const BwdArgs p) {
  __shared__ typename Tl::Smem sm;
  if (blockIdx.x == 0) {
    for (int64_t i = threadIdx.x; i < p.num_counters; i += kThreads) p.counters[i] = 0;
  }
  const unsigned r_tiles = static_cast<unsigned>(ceil_div(p.r, Tl::BN));
  const T* dy = static_cast<const T*>(p.dy);
  float acc[Tl::TM * Tl::TN] = {};

  if (blockIdx.x < p.ds_blocks) {
    unsigned b = blockIdx.x;
    const unsigned split = b % p.ds_split.count;
    b /= p.ds_split.count;
    const int64_t j0 = static_cast<int64_t>(b % r_tiles) * Tl::BN;
    const int64_t m0 = static_cast<int64_t>(b / r_tiles) * Tl::BM;
    const int64_t n_begin = split * p.ds_split.len, n_end = min(p.N, n_begin + p.ds_split.len);
    tile_gemm<Tl, Contig::kKd, Contig::kRow>(
        sm, n_begin, n_end, RowsOf<T>{dy, p.N, m0, p.M},
        ColsOf<T>{static_cast<const T*>(p.b), p.r, j0, p.r}, acc);
    store_partial<Tl>(p.ds_part + split * p.M * p.r, p.r, m0, p.M, j0, p.r, p.scaling, acc);
  } else {
    unsigned b = blockIdx.x - p.ds_blocks;
    const unsigned split = b % p.db_split.count;
    b /= p.db_split.count;
    const int64_t j0 = static_cast<int64_t>(b % r_tiles) * Tl::BN;
    const int64_t n0 = static_cast<int64_t>(b / r_tiles) * Tl::BM;
    const int64_t m_begin = split * p.db_split.len, m_end = min(p.M, m_begin + p.db_split.len);
    tile_gemm<Tl, Contig::kRow, Contig::kRow>(
        sm, m_begin, m_end, ColsOf<T>{dy, p.N, n0, p.N},
        ColsOf<T>{static_cast<const T*>(p.s), p.r, j0, p.r}, acc);
    store_partial<Tl>(p.db_part + split * p.N * p.r, p.r, n0, p.N, j0, p.r, p.scaling, acc);
  }
}

// dx_init tile (64 rows x 64 columns of dx): keep_scale mask (dS A).
template <typename T, class Wide>
__device__ __forceinline__ void dx_init_tile(const BwdArgs& p, typename Wide::Smem& sm,
                                             unsigned b) {
  const unsigned k_tiles = static_cast<unsigned>(ceil_div(p.K, Wide::BN));
  const int64_t k0 = static_cast<int64_t>(b % k_tiles) * Wide::BN;
  const int64_t m0 = static_cast<int64_t>(b / k_tiles) * Wide::BM;
  float acc[Wide::TM * Wide::TN] = {};
  tile_gemm<Wide, Contig::kKd, Contig::kRow>(
      sm, 0, p.r, SplitSum<false>{p.ds_part, p.M, p.r, m0, p.ds_split.count},
      ColsOf<T>{static_cast<const T*>(p.a), p.K, k0, p.K}, acc);
  T* dx = static_cast<T*>(p.dx);
  const lora_dropout_t drop = seeded(p.dropout);
#pragma unroll
  for (int i = 0; i < Wide::TM; ++i) {
    const int64_t m = m0 + Wide::row_of(i);
#pragma unroll
    for (int j = 0; j < Wide::TN; ++j) {
      const int64_t k = k0 + Wide::col_of(j);
      if (m < p.M && k < p.K) {
        dx[m * p.K + k] = from_float<T>(dropout_apply(drop, m, k, acc[i * Wide::TN + j]));
      }
    }
  }
}

// dS rows [64 b, 64 b + 64) summed from their partials, rounded to dtype, into ds_round.
template <typename T>
__device__ __forceinline__ void ds_round_rows(const BwdArgs& p, unsigned b) {
  const int64_t m0 = static_cast<int64_t>(b) * 64;
  const SplitSum<false> ds{p.ds_part, p.M, p.r, m0, p.ds_split.count};
  T* out = static_cast<T*>(p.ds_round);
  for (int64_t i = threadIdx.x; i < 64 * p.r; i += kThreads) {
    const int row = static_cast<int>(i / p.r);
    const int64_t j = i % p.r;
    if (m0 + row < p.M) out[(m0 + row) * p.ld_ds_round + j] = from_float<T>(ds(row, j));
  }
}

// dA tile (64 columns of x x one rank tile), computed as dA^T = drop(x)^T dS over one split of
// M; the last block of the tile to finish adds the splits' partials in order and stores dA.
template <typename T, class Tl>
__device__ __forceinline__ void da_tile(const BwdArgs& p, typename Tl::Smem& sm, unsigned b,
                                        int* is_last) {
  const unsigned r_tiles = static_cast<unsigned>(ceil_div(p.r, Tl::BN));
  const unsigned split = b % p.da_split.count;
  const unsigned tile = b / p.da_split.count;
  const int64_t j0 = static_cast<int64_t>(tile % r_tiles) * Tl::BN;
  const int64_t k0 = static_cast<int64_t>(tile / r_tiles) * Tl::BM;
  const int64_t m_begin = split * p.da_split.len, m_end = min(p.M, m_begin + p.da_split.len);
  float acc[Tl::TM * Tl::TN] = {};
  tile_gemm<Tl, Contig::kRow, Contig::kRow>(
      sm, m_begin, m_end, DroppedX<T, true>{static_cast<const T*>(p.x), p.ldx, k0, p.K,
                                              seeded(p.dropout)},
      SplitSum<true>{p.ds_part, p.M, p.r, j0, p.ds_split.count}, acc);
  store_partial<Tl>(p.da_part + split * p.K * p.r, p.r, k0, p.K, j0, p.r, 1.0f, acc);

  // Publish this split, then count it; the block that completes the count sees every split.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *is_last = atomicAdd(&p.counters[tile], 1) == p.da_split.count - 1;
  __syncthreads();
  if (!*is_last) return;
  __threadfence();
  T* da = static_cast<T*>(p.da);
  for (int i = threadIdx.x; i < Tl::BM * Tl::BN; i += kThreads) {
    const int64_t k = k0 + i % Tl::BM, j = j0 + i / Tl::BM;
    if (k >= p.K || j >= p.r) continue;
    float sum = 0.0f;
    for (int s = 0; s < p.da_split.count; ++s) sum += __ldcg(&p.da_part[(s * p.K + k) * p.r + j]);
    da[j * p.K + k] = from_float<T>(sum);
  }
}

// Launch 2. Blocks [0, dx_blocks): dx_init tiles (or dS rows for the adapter-in-GEMM plan);
// then dA tiles x splits; then dB finishing.
template <typename T, class Tl, class Wide>
__global__ void __launch_bounds__(kThreads, 2) bwd_ds_kernel(const BwdArgs p) {
  __shared__ union {
    typename Wide::Smem dx;
    typename Tl::Smem da;
  } sm;
  __shared__ int is_last;
  unsigned b = blockIdx.x;
  if (b < p.dx_blocks) {
    if (p.ds_round != nullptr) {
      ds_round_rows<T>(p, b);
    } else {
      dx_init_tile<T, Wide>(p, sm.dx, b);
    }
    return;
  }
  b -= p.dx_blocks;
  if (b < p.da_blocks) {
    da_tile<T, Tl>(p, sm.da, b, &is_last);
    return;
  }
  b -= p.da_blocks;
  const int64_t total = p.N * p.r;
  const int64_t e0 = static_cast<int64_t>(b) * kFinishPerBlock;
  const int64_t e1 = min(total, e0 + kFinishPerBlock);
  T* db = static_cast<T*>(p.db);
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kThreads) {
    float sum = 0.0f;
    for (int s = 0; s < p.db_split.count; ++s) sum += p.db_part[s * total + e];
    db[e] = from_float<T>(sum);
  }
}

template <typename T, class Tl, class Wide>
lora_status_t run_bwd(const BwdArgs& args, cudaStream_t stream) {
  const unsigned stage1 = args.ds_blocks + args.db_blocks;
  if (stage1 > 0) {
    bwd_dy_kernel<T, Tl><<<stage1, kThreads, 0, stream>>>(args);
    LORA_RETURN_IF_ERROR(launch_status());
  }
  const unsigned stage2 = args.dx_blocks + args.da_blocks + args.db_fin_blocks;
  if (stage2 > 0) {
    bwd_ds_kernel<T, Tl, Wide><<<stage2, kThreads, 0, stream>>>(args);
    LORA_RETURN_IF_ERROR(launch_status());
  }
  return LORA_OK;
}

}  // namespace
}  // namespace detail

size_t lora_linear_bwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                       int64_t r) {
  if (M < 0 || N < 0 || K < 0 || r < 0) return 0;
  return detail::plan_bwd(dtype, M, N, K, r, nullptr).workspace_bytes;
}

lora_status_t lora_linear_bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* dy, const void* x, int64_t ldx, const void* weight,
                              const void* lora_a, const void* lora_b, const void* s_saved,
                              float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a,
                              void* d_lora_b, const Context& ctx) {
  using detail::present;
  if (M < 0 || N < 0 || K < 0 || r < 0) return LORA_ERR_INVALID_ARGUMENT;
  if (r > detail::kMaxRank) return LORA_ERR_UNSUPPORTED;
  const bool want_dx = dx != nullptr, want_da = d_lora_a != nullptr;
  const bool want_db = d_lora_b != nullptr, want_ds = want_dx || want_da;
  // Inputs are needed only by the outputs asked for.
  if (!present(dy, (want_ds || want_db) ? M * N : 0) || !present(x, want_da ? M * K : 0) ||
      (want_da && M > 1 && ldx < K) || !present(weight, want_dx ? N * K : 0) ||
      !present(lora_a, want_dx ? r * K : 0) || !present(lora_b, want_ds ? N * r : 0) ||
      !present(s_saved, want_db ? M * r : 0)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  if (want_dx && M > 0 && N > 0 && K > 0 && ctx.cublas == nullptr) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  const size_t elem = static_cast<size_t>(detail::dtype_size(dtype));
  if (M == 0) {  // sums over no rows: dA and dB are zero
    if (want_da && r * K > 0 &&
        cudaMemsetAsync(d_lora_a, 0, r * K * elem, ctx.stream) != cudaSuccess) {
      return LORA_ERR_CUDA;
    }
    if (want_db && N * r > 0 &&
        cudaMemsetAsync(d_lora_b, 0, N * r * elem, ctx.stream) != cudaSuccess) {
      return LORA_ERR_CUDA;
    }
    return LORA_OK;
  }

  const detail::BwdPlan plan = detail::plan_bwd(dtype, M, N, K, r, ctx.workspace);
  if (ctx.workspace_bytes < plan.workspace_bytes ||
      (plan.workspace_bytes > 0 && ctx.workspace == nullptr)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  detail::BwdArgs args{};
  args.M = M;
  args.N = N;
  args.K = K;
  args.r = r;
  args.dy = dy;
  args.x = x;
  args.ldx = ldx;
  args.a = lora_a;
  args.b = lora_b;
  args.s = s_saved;
  args.scaling = scaling;
  args.dropout = dropout;
  args.dx = dx;
  args.da = d_lora_a;
  args.db = d_lora_b;
  args.ds_part = plan.ds_part;
  args.db_part = plan.db_part;
  args.da_part = plan.da_part;
  args.counters = plan.counters;
  args.ds_split = plan.ds_split;
  args.db_split = plan.db_split;
  args.da_split = plan.da_split;
  const int64_t ds_blocks = want_ds ? plan.row_tiles * plan.r_tiles * plan.ds_split.count : 0;
  const int64_t db_blocks = want_db ? plan.n_tiles * plan.r_tiles * plan.db_split.count : 0;
  // dX = dY W + dS A in one GEMM (out K wide, N + r deep) where the plan applies.
  const detail::AdapterGemmArgs dx_gemm{M, K, N, r, dy, N, weight, plan.ds_round,
                                        detail::adapter_gemm_ld_s(r), lora_a, nullptr, dx,
                                        detail::WeightLayout::kDepthByOut};
  const bool gemm_eligible = want_dx && plan.ds_round != nullptr && dropout.threshold == 0;
  const bool dx_in_gemm = gemm_eligible && detail::adapter_gemm_usable(dtype, dx_gemm);
  if (gemm_eligible && !dx_in_gemm &&
      detail::adapter_gemm_mode() == detail::AdapterGemmMode::kRequired) {
    return LORA_ERR_UNSUPPORTED;
  }
  if (dx_in_gemm) {
    args.ds_round = plan.ds_round;
    args.ld_ds_round = dx_gemm.ld_s_scaled;
  }
  const int64_t dx_blocks =
      !want_dx ? 0 : (dx_in_gemm ? plan.row_tiles : plan.row_tiles * plan.k_tiles);
  const int64_t da_blocks = want_da ? plan.k_tiles * plan.r_tiles * plan.da_split.count : 0;
  const int64_t db_fin_blocks = want_db ? detail::ceil_div(N * r, detail::kFinishPerBlock) : 0;
  if (ds_blocks + db_blocks > INT32_MAX || dx_blocks + da_blocks + db_fin_blocks > INT32_MAX) {
    return LORA_ERR_UNSUPPORTED;
  }
  args.num_counters = da_blocks > 0 ? plan.k_tiles * plan.r_tiles : 0;
  args.ds_blocks = static_cast<unsigned>(ds_blocks);
  args.db_blocks = static_cast<unsigned>(db_blocks);
  args.dx_blocks = static_cast<unsigned>(dx_blocks);
  args.da_blocks = static_cast<unsigned>(da_blocks);
  args.db_fin_blocks = static_cast<unsigned>(db_fin_blocks);

  LORA_RETURN_IF_ERROR(detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return detail::dispatch_tiles<T>([&](auto tiles) {
      using Thin = typename decltype(tiles)::Thin;
      using Wide = typename decltype(tiles)::Wide;
      return plan.thin ? detail::run_bwd<T, Thin, Wide>(args, ctx.stream)
                       : detail::run_bwd<T, Wide, Wide>(args, ctx.stream);
    });
  }));
  if (!want_dx) return LORA_OK;
  if (dx_in_gemm) return detail::adapter_gemm(dtype, dx_gemm, ctx.stream);
  return detail::gemm_add_dy_w(ctx, dtype, M, N, K, dy, weight, dx);
}

}  // namespace cuda
}  // namespace lora_ops
