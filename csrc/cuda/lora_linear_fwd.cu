// Single-adapter LoRA linear forward on CUDA (math in kernels.h):
//   S = drop(x) A^T rounded to dtype (dropout applied as x is read, never materialised),
//   y = x W^T + b + scaling * S B^T.
//
// Three plans, by M (see NOTES.md for the byte/FLOP model behind them):
//  - decode: on GPUs with thread block clusters, M <= 16, one launch (decode_cluster.cu); else,
//    M <= 8, shrink (launch_shrink, one adapter) then the fused GEMV that streams W once and
//    adds b and the adapter term in its epilogue. 1 or 2 launches, no cuBLAS.
//  - large M (>= kFusedMinRows, r <= kFusedMaxRank): one kernel per 64-row tile computes S into
//    shared memory (and s_out), then y_init = b + scaling * S B^T for all N columns; cuBLAS adds
//    x W^T onto y (beta = 1). 2 launches.
//  - otherwise: a split-K shrink into fp32 partials (enough blocks even for a few row tiles), a
//    kernel writing y_init over an (M, N) tile grid that adds the partials in a fixed order,
//    rounds S to dtype and stores it, then cuBLAS. 3 launches.
//  On GPUs with thread block clusters, M > 16 and r <= kClusterMaxRank take the cluster plan
//  instead of the last two: a cluster per 64-row tile splits the shrink's depth between its
//  blocks, adds their partials through distributed shared memory and writes y_init; then
//  cuBLAS. 2 launches for any M.
//  On Hopper, fp16 / bf16 with K, N, r multiples of 8 and enough rows to fill the GPU take the
//  adapter-in-GEMM plan (adapter_gemm.cuh) instead: the cluster kernel computes only S and
//  scaling * S, then one CUTLASS GEMM runs K + r deep over [x | scaling S] and [W | B] with the
//  bias in its epilogue. 2 launches, no y_init round trip, no cuBLAS.
// The adapter products run on tensor-core tiles for fp16 / bf16 (mma_tile.cuh; operands rounded
// to dtype as they are staged) and on fp32 SIMT tiles for fp32 or with LORA_OPS_CUDA_MMA=0
// (tile_gemm.cuh); y_init is rounded to dtype once before cuBLAS adds x W^T, as the CPU backend
// does.
#include <stdint.h>

#include "adapter_gemm.cuh"
#include "cluster.cuh"
#include "common.cuh"
#include "dtype.cuh"
#include "launchers.cuh"
#include "lora_linear_fwd.cuh"
#include "lora_ops/kernels.h"
#include "mma_tile.cuh"
#include "tile_gemm.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

constexpr int64_t kFusedMinRows = 8192;  // 128 row tiles: enough blocks without a split
constexpr int64_t kFusedMaxRank = 64;    // S of a 64-row tile stays in shared memory
constexpr int kMaxShrinkSplits = 4;

enum class FwdPath { kEmpty, kDecode, kFused, kSplit };

struct FwdPlan {
  FwdPath path;
  bool thin;  // r <= 16: shrink tiles 64 x 16
  int splits;
  int64_t split_len;
  float* s_part;  // kSplit
  float* t;       // kDecode: S as fp32, [M, r]
  void* s_scaled;  // where the adapter-in-GEMM plan may run: scaling * S, [M, ld_s_scaled]
  size_t workspace_bytes;
};

FwdPlan plan_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                 void* workspace) {
  FwdPlan plan{};
  plan.thin = r <= ThinTile::BN;
  plan.splits = 1;
  plan.split_len = ThinTile::BK;
  WorkspaceLayout ws(workspace);
  if (M == 0) {
    plan.path = FwdPath::kEmpty;
  } else if (M <= kGemvMaxRows) {
    plan.path = FwdPath::kDecode;
    plan.t = ws.take<float>(static_cast<size_t>(M * r));
  } else if (M >= kFusedMinRows && r <= kFusedMaxRank) {
    plan.path = FwdPath::kFused;
  } else {
    plan.path = FwdPath::kSplit;
    const int64_t tiles = ceil_div(M, 64) * ceil_div(r, plan.thin ? ThinTile::BN : WideTile::BN);
    const int64_t max_splits = clamp64(ceil_div(K, 256), 1, kMaxShrinkSplits);
    const int64_t splits = clamp64(ceil_div(kTargetBlocks, tiles > 0 ? tiles : 1), 1, max_splits);
    plan.split_len = round_up(ceil_div(K, splits), ThinTile::BK);
    if (plan.split_len == 0) plan.split_len = ThinTile::BK;
    plan.splits = static_cast<int>(clamp64(ceil_div(K, plan.split_len), 1, max_splits));
    plan.s_part = ws.take<float>(static_cast<size_t>(plan.splits * M * r));
  }
  if (r <= kClusterMaxRank && adapter_gemm_shape_ok(dtype, M, N, K, r)) {  // M >= 128
    const int64_t bytes = M * adapter_gemm_ld_s(r) * dtype_size(dtype);
    plan.s_scaled = ws.take<char>(static_cast<size_t>(bytes));
  }
  plan.workspace_bytes = ws.bytes();
  return plan;
}

template <typename T, class Wide>
__device__ __forceinline__ void store_y_tile(const FwdArgs& p, int64_t m0, int64_t n0,
                                             const float (&acc)[Wide::TM * Wide::TN]) {
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < Wide::TM; ++i) {
    const int64_t m = m0 + Wide::row_of(i);
#pragma unroll
    for (int j = 0; j < Wide::TN; ++j) {
      const int64_t n = n0 + Wide::col_of(j);
      if (m < p.M && n < p.N) {
        const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
        y[m * p.N + n] = from_float<T>(fmaf(p.scaling, acc[i * Wide::TN + j], b));
      }
    }
  }
}

// Block = (64-row tile, rank tile, split of K): s_part[split] = drop(x) A^T over that split.
template <typename T, class Tl>
__global__ void __launch_bounds__(kThreads, 2) shrink_split_kernel(const FwdArgs p) {
  __shared__ typename Tl::Smem sm;
  const unsigned r_tiles = static_cast<unsigned>(ceil_div(p.r, Tl::BN));
  unsigned b = blockIdx.x;
  const unsigned split = b % p.splits;
  b /= p.splits;
  const int64_t j0 = static_cast<int64_t>(b % r_tiles) * Tl::BN;
  const int64_t m0 = static_cast<int64_t>(b / r_tiles) * Tl::BM;
  const int64_t k_begin = split * p.split_len;
  const int64_t k_end = min(p.K, k_begin + p.split_len);

  float acc[Tl::TM * Tl::TN] = {};
  tile_gemm<Tl, Contig::kKd, Contig::kKd>(
      sm, k_begin, k_end,
      DroppedX<T, false>{static_cast<const T*>(p.x), p.ldx, m0, p.M, seeded(p.dropout)},
      RowsOf<T>{static_cast<const T*>(p.a), p.K, j0, p.r}, acc);
  float* part = p.s_part + split * p.M * p.r;
#pragma unroll
  for (int i = 0; i < Tl::TM; ++i) {
    const int64_t m = m0 + Tl::row_of(i);
#pragma unroll
    for (int j = 0; j < Tl::TN; ++j) {
      const int64_t jj = j0 + Tl::col_of(j);
      if (m < p.M && jj < p.r) part[m * p.r + jj] = acc[i * Tl::TN + j];
    }
  }
}

// S(m, j) from the split partials, rounded to dtype as it is stored.
template <typename T>
struct RoundedS {
  SplitSum<false> sum;
  __device__ float operator()(int row, int64_t kd) const { return round_to<T>(sum(row, kd)); }
};

// Column tiles of y; at least one, whose blocks also store S (even when N is 0).
__host__ __device__ inline int64_t y_col_tiles(int64_t N) {
  return N > 0 ? ceil_div(N, WideTile::BN) : 1;
}

// Block = (64-row tile, 64-column tile): y = b + scaling * S B^T; the blocks of column tile 0
// also store S.
template <typename T, class Wide>
__global__ void __launch_bounds__(kThreads, 2) expand_init_kernel(const FwdArgs p) {
  __shared__ typename Wide::Smem sm;
  const unsigned n_tiles = static_cast<unsigned>(y_col_tiles(p.N));
  const unsigned n_tile = blockIdx.x % n_tiles;
  const int64_t n0 = static_cast<int64_t>(n_tile) * Wide::BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / n_tiles) * Wide::BM;
  const RoundedS<T> s{SplitSum<false>{p.s_part, p.M, p.r, m0, p.splits}};

  float acc[Wide::TM * Wide::TN] = {};
  tile_gemm<Wide, Contig::kKd, Contig::kKd>(
      sm, 0, p.r, s, RowsOf<T>{static_cast<const T*>(p.b), p.r, n0, p.N}, acc);
  store_y_tile<T, Wide>(p, m0, n0, acc);

  if (n_tile == 0) {
    T* s_out = static_cast<T*>(p.s_out);
    const int r = static_cast<int>(p.r);
    for (int i = threadIdx.x; i < Wide::BM * r; i += kThreads) {
      const int row = i / r, j = i % r;
      if (m0 + row < p.M) s_out[(m0 + row) * p.r + j] = from_float<T>(s(row, j));
    }
  }
}

// S(row, j) of the tile, from shared memory rows of ld floats.
struct TileS {
  const float* rows;
  int64_t ld;
  __device__ float operator()(int row, int64_t kd) const { return rows[row * ld + kd]; }
};

// Block = 64-row tile: S for the tile (into shared memory and s_out), then y = b + scaling S B^T
// for every column.
template <typename T, class Tl, class Wide>
__global__ void __launch_bounds__(kThreads, 2) fused_adapter_kernel(const FwdArgs p) {
  static_assert(Tl::BM == WideTile::BM && Wide::BM == WideTile::BM,
                "both phases cover the same rows");
  __shared__ union {
    typename Tl::Smem shrink;
    typename Wide::Smem expand;
  } sm;
  __shared__ float s_tile[WideTile::BM][kFusedMaxRank];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * WideTile::BM;
  T* s_out = static_cast<T*>(p.s_out);

  for (int64_t j0 = 0; j0 < p.r; j0 += Tl::BN) {
    float acc[Tl::TM * Tl::TN] = {};
    tile_gemm<Tl, Contig::kKd, Contig::kKd>(
        sm.shrink, 0, p.K,
        DroppedX<T, false>{static_cast<const T*>(p.x), p.ldx, m0, p.M, seeded(p.dropout)},
        RowsOf<T>{static_cast<const T*>(p.a), p.K, j0, p.r}, acc);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
      const int row = Tl::row_of(i);
#pragma unroll
      for (int j = 0; j < Tl::TN; ++j) {
        const int64_t jj = j0 + Tl::col_of(j);
        if (jj < p.r) {
          const float v = round_to<T>(acc[i * Tl::TN + j]);
          s_tile[row][jj] = v;
          if (m0 + row < p.M) s_out[(m0 + row) * p.r + jj] = from_float<T>(v);
        }
      }
    }
  }
  __syncthreads();

  for (int64_t n0 = 0; n0 < p.N; n0 += Wide::BN) {
    float acc[Wide::TM * Wide::TN] = {};
    tile_gemm<Wide, Contig::kKd, Contig::kKd>(
        sm.expand, 0, p.r, TileS{&s_tile[0][0], kFusedMaxRank},
        RowsOf<T>{static_cast<const T*>(p.b), p.r, n0, p.N},
        acc);
    store_y_tile<T, Wide>(p, m0, n0, acc);
  }
}

// Block = one of the kClusterBlocks blocks of the cluster that owns a 64-row tile. The blocks
// split the shrink's depth (split_len each) into fp32 partials in shared memory, add all the
// cluster's partials in block-rank order through distributed shared memory (S, rounded to
// dtype; block 0 stores it to s_out), then split the tile's column tiles of
// y = b + scaling * S B^T between them. Replaces the split plan's two launches with one.
template <typename T, class Tl, class Wide>
__global__ void __launch_bounds__(kThreads, 2) cluster_adapter_kernel(const FwdArgs p) {
#ifdef LORA_OPS_HAS_CLUSTERS
  static_assert(Tl::BM == WideTile::BM && Wide::BM == WideTile::BM,
                "both phases cover the same rows");
  __shared__ union {
    typename Tl::Smem shrink;
    typename Wide::Smem expand;
  } sm;
  extern __shared__ float dyn_smem[];
  const int64_t r = p.r;
  float* s_part = dyn_smem;                     // [BM][r], this block's share of the depth
  float* s_tile = dyn_smem + WideTile::BM * r;  // [BM][r], S of the tile
  const unsigned block_rank = cluster_block_rank();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / kClusterBlocks) * WideTile::BM;
  const int64_t k_lo = min(p.K, static_cast<int64_t>(block_rank) * p.split_len);
  const int64_t k_hi = min(p.K, k_lo + p.split_len);

  for (int64_t j0 = 0; j0 < r; j0 += Tl::BN) {
    float acc[Tl::TM * Tl::TN] = {};
    tile_gemm<Tl, Contig::kKd, Contig::kKd>(
        sm.shrink, k_lo, k_hi,
        DroppedX<T, false>{static_cast<const T*>(p.x), p.ldx, m0, p.M, seeded(p.dropout)},
        RowsOf<T>{static_cast<const T*>(p.a), p.K, j0, r}, acc);
#pragma unroll
    for (int i = 0; i < Tl::TM; ++i) {
#pragma unroll
      for (int j = 0; j < Tl::TN; ++j) {
        const int64_t jj = j0 + Tl::col_of(j);
        if (jj < r) s_part[Tl::row_of(i) * r + jj] = acc[i * Tl::TN + j];
      }
    }
  }
  cluster_arrive();
  cluster_wait();
  // Every block needs all of S for its expand tiles, and block 0 stores it; with no expand phase
  // (shrink_only) the blocks split the sums and the stores between them instead.
  const bool split_sums = p.shrink_only;
  T* s_out = split_sums || block_rank == 0 ? static_cast<T*>(p.s_out) : nullptr;
  T* s_scaled = split_sums || block_rank == 0 ? static_cast<T*>(p.s_scaled) : nullptr;
  const int64_t first = threadIdx.x + (split_sums ? block_rank * kThreads : 0);
  const int64_t step = split_sums ? kThreads * kClusterBlocks : kThreads;
  for (int64_t i = first; i < WideTile::BM * r; i += step) {
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < kClusterBlocks; ++c) sum += load_peer_shared(s_part + i, c);
    const float v = round_to<T>(sum);
    s_tile[i] = v;
    const int64_t m = m0 + i / r;
    if (s_out != nullptr && m < p.M) s_out[m * r + i % r] = from_float<T>(v);
    if (s_scaled != nullptr && m < p.M) {
      s_scaled[m * p.ld_s_scaled + i % r] = from_float<T>(p.scaling * sum);
    }
  }
  __syncthreads();
  cluster_arrive();  // this block is done reading its peers' partials

  const int64_t n_tiles = p.shrink_only ? 0 : ceil_div(p.N, WideTile::BN);
  for (int64_t n_tile = block_rank; n_tile < n_tiles; n_tile += kClusterBlocks) {
    const int64_t n0 = n_tile * WideTile::BN;
    float acc[Wide::TM * Wide::TN] = {};
    tile_gemm<Wide, Contig::kKd, Contig::kKd>(
        sm.expand, 0, r, TileS{s_tile, r}, RowsOf<T>{static_cast<const T*>(p.b), r, n0, p.N},
        acc);
    store_y_tile<T, Wide>(p, m0, n0, acc);
  }
  cluster_wait();  // no block leaves while a peer may still read its partials
#else
  __trap();  // launched only where clusters_enabled() holds, i.e. on sm_90+ code
#endif
}

template <typename T, class Tiles>
lora_status_t run_fused(const FwdArgs& args, bool thin, cudaStream_t stream) {
  using Thin = typename Tiles::Thin;
  using Wide = typename Tiles::Wide;
  const int64_t blocks = ceil_div(args.M, WideTile::BM);
  if (blocks > INT32_MAX) return LORA_ERR_UNSUPPORTED;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (thin) {
    fused_adapter_kernel<T, Thin, Wide><<<grid, kThreads, 0, stream>>>(args);
  } else {
    fused_adapter_kernel<T, Wide, Wide><<<grid, kThreads, 0, stream>>>(args);
  }
  return launch_status();
}

template <typename T, class Tiles>
lora_status_t run_split(const FwdArgs& args, bool thin, cudaStream_t stream) {
  const int64_t row_tiles = ceil_div(args.M, WideTile::BM);
  if (args.r > 0) {
    const int64_t shrink_blocks =
        row_tiles * ceil_div(args.r, thin ? ThinTile::BN : WideTile::BN) * args.splits;
    if (shrink_blocks > INT32_MAX) return LORA_ERR_UNSUPPORTED;
    const unsigned grid = static_cast<unsigned>(shrink_blocks);
    if (thin) {
      shrink_split_kernel<T, typename Tiles::Thin><<<grid, kThreads, 0, stream>>>(args);
    } else {
      shrink_split_kernel<T, typename Tiles::Wide><<<grid, kThreads, 0, stream>>>(args);
    }
    LORA_RETURN_IF_ERROR(launch_status());
  }
  const int64_t expand_blocks = row_tiles * y_col_tiles(args.N);
  if (expand_blocks > INT32_MAX) return LORA_ERR_UNSUPPORTED;
  expand_init_kernel<T, typename Tiles::Wide>
      <<<static_cast<unsigned>(expand_blocks), kThreads, 0, stream>>>(args);
  return launch_status();
}

// The cluster plan, if this GPU has clusters and S of a row tile fits in shared memory:
// *launched tells whether it ran.
template <typename T, class Tiles>
lora_status_t run_cluster(FwdArgs args, bool thin, cudaStream_t stream, bool* launched) {
  using Thin = typename Tiles::Thin;
  using Wide = typename Tiles::Wide;
  *launched = false;
  if (args.r > kClusterMaxRank || !clusters_enabled()) return LORA_OK;
  const int64_t clusters = ceil_div(args.M, WideTile::BM);
  if (clusters * kClusterBlocks > INT32_MAX) return LORA_ERR_UNSUPPORTED;
  args.split_len = round_up(ceil_div(args.K, kClusterBlocks), ThinTile::BK);
  const size_t smem = 2 * sizeof(float) * WideTile::BM * static_cast<size_t>(args.r);
  const auto kernel =
      thin ? cluster_adapter_kernel<T, Thin, Wide> : cluster_adapter_kernel<T, Wide, Wide>;
  const int fit = max_active_clusters(reinterpret_cast<const void*>(kernel), smem);
  if (fit == kNoClusterCode) return LORA_OK;
  if (fit <= 0) return cluster_refused();
  *launched = true;
  return launch_clusters(kernel, static_cast<int>(clusters), smem, stream, args);
}

// The adapter kernels of the fused or split plan (or the cluster plan in their place), on the
// tiles this device runs for T.
template <typename T>
lora_status_t run_adapter(const FwdArgs& args, const FwdPlan& plan, cudaStream_t stream) {
  return dispatch_tiles<T>([&](auto tiles) {
    using Tiles = decltype(tiles);
    bool launched = false;
    LORA_RETURN_IF_ERROR((run_cluster<T, Tiles>(args, plan.thin, stream, &launched)));
    if (launched) return LORA_OK;
    return plan.path == FwdPath::kFused ? run_fused<T, Tiles>(args, plan.thin, stream)
                                        : run_split<T, Tiles>(args, plan.thin, stream);
  });
}

// The adapter-in-GEMM plan: S and scaling * S from the cluster kernel, then the GEMM writes y.
// *launched = false, having launched nothing, where it does not apply to this call.
lora_status_t run_adapter_in_gemm(lora_dtype_t dtype, FwdArgs args, const FwdPlan& plan,
                                  cudaStream_t stream, bool* launched) {
  *launched = false;
  const AdapterGemmArgs g{args.M, args.N, args.K, args.r, args.x, args.ldx, args.w,
                          plan.s_scaled, adapter_gemm_ld_s(args.r), args.b, args.bias, args.y,
                          WeightLayout::kOutByDepth};
  if (!adapter_gemm_usable(dtype, g)) return LORA_OK;
  args.shrink_only = true;
  args.s_scaled = plan.s_scaled;
  args.ld_s_scaled = g.ld_s_scaled;
  LORA_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_tiles<T>([&](auto tiles) {
      return run_cluster<T, decltype(tiles)>(args, plan.thin, stream, launched);
    });
  }));
  if (!*launched) return LORA_OK;
  return adapter_gemm(dtype, g, stream);
}

}  // namespace
}  // namespace detail

size_t lora_linear_fwd_workspace_bytes(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K,
                                       int64_t r) {
  if (M < 0 || N < 0 || K < 0 || r < 0) return 0;
  return detail::plan_fwd(dtype, M, N, K, r, nullptr).workspace_bytes;
}

lora_status_t lora_linear_fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                              const void* x, int64_t ldx, const void* weight, const void* bias,
                              const void* lora_a, const void* lora_b, float scaling,
                              lora_dropout_t dropout, void* s_out, void* y, const Context& ctx) {
  using detail::present;
  if (!detail::non_negative(M, N, K, r) || !detail::row_stride_ok(ldx, M, K)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  if (r > detail::kMaxRank) return LORA_ERR_UNSUPPORTED;
  if (!present(x, M * K) || !present(weight, N * K) || !present(lora_a, r * K) ||
      !present(lora_b, N * r) || !present(s_out, M * r) || !present(y, M * N)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }
  const detail::FwdPlan plan = detail::plan_fwd(dtype, M, N, K, r, ctx.workspace);
  if (plan.path == detail::FwdPath::kEmpty) return LORA_OK;
  if (ctx.workspace_bytes < plan.workspace_bytes ||
      (plan.workspace_bytes > 0 && ctx.workspace == nullptr)) {
    return LORA_ERR_INVALID_ARGUMENT;
  }

  detail::FwdArgs args{};
  args.M = M;
  args.N = N;
  args.K = K;
  args.r = r;
  args.x = x;
  args.ldx = ldx;
  args.w = weight;
  args.bias = bias;
  args.a = lora_a;
  args.b = lora_b;
  args.scaling = scaling;
  args.dropout = dropout;
  args.s_out = s_out;
  args.y = y;
  args.s_part = plan.s_part;
  args.splits = plan.splits;
  args.split_len = plan.split_len;

  if (M <= detail::kDecodeClusterMaxRows) {
    bool launched = false;
    LORA_RETURN_IF_ERROR(detail::launch_decode_cluster(dtype, args, ctx.stream, &launched));
    if (launched) return LORA_OK;
  }
  if (plan.path == detail::FwdPath::kDecode) {
    detail::ShrinkParams sp{};
    sp.M = M;
    sp.K = K;
    sp.r_max = r;
    sp.num_slices = 1;
    sp.x = x;
    sp.ldx = ldx;
    sp.a[0] = AdapterStack{lora_a, 0, K, 1};
    sp.map = detail::uniform_row_map();
    sp.rank = detail::RankInfo{nullptr, nullptr, r, r};
    sp.dropout = dropout;
    sp.t = plan.t;
    sp.round_t = true;
    sp.s_out = s_out;
    detail::ExpandParams ep{};
    ep.M = M;
    ep.r_max = r;
    ep.num_slices = 1;
    ep.t = plan.t;
    ep.b[0] = AdapterStack{lora_b, 0, r, 1};
    ep.offset[0] = 0;
    ep.width[0] = N;
    ep.map = sp.map;
    ep.rank = sp.rank;
    ep.y = y;
    ep.ldy = N;
    return detail::launch_decode_layer(dtype, sp, ep, N, weight, bias, scaling, ctx.stream);
  }

  if (plan.s_scaled != nullptr) {
    bool launched = false;
    LORA_RETURN_IF_ERROR(detail::run_adapter_in_gemm(dtype, args, plan, ctx.stream, &launched));
    if (launched) return LORA_OK;
    // Required where the plan applies: with the cluster plans switched off the forward has no
    // kernel for its s·S, so the plan does not apply (the backward's needs none and still runs).
    if (detail::adapter_gemm_mode() == detail::AdapterGemmMode::kRequired &&
        detail::clusters_run_here()) {
      return LORA_ERR_UNSUPPORTED;
    }
  }
  // Only these plans end in cuBLAS: the handle may be NULL for the others (the C ABI's
  // `cublas`), so it is checked here, before the first launch of a plan that needs it.
  if (N > 0 && K > 0 && ctx.cublas == nullptr) return LORA_ERR_INVALID_ARGUMENT;
  LORA_RETURN_IF_ERROR(detail::dispatch_dtype(dtype, [&](auto tag) {
    return detail::run_adapter<typename decltype(tag)::type>(args, plan, ctx.stream);
  }));
  return detail::gemm_add_x_wt(ctx, dtype, M, N, K, x, ldx, weight, y);
}

}  // namespace cuda
}  // namespace lora_ops
