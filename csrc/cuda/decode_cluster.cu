// The single-adapter decode forward in one launch (lora_linear_fwd.cuh), for GPUs with thread
// block clusters, M <= 16. Why one launch matters here: at decode sizes the layer is a read of W
// (~11 us for K = N = 4096 bf16 on an H100) and a separate shrink launch costs a launch gap plus
// its own latency, a sizeable fraction of that.
//
// Every cluster computes the whole S = drop(x) A^T [M, r] redundantly: its kClusterBlocks blocks
// each take one chunk of the depth K (a warp per few ranks) and publish fp32 partials in shared
// memory (up to 8 rows, after streaming their first W columns). The blocks stream their columns
// of W (grid-stride over groups of kDecodeCols columns, as the decode GEMV does) and, before the
// first epilogue that needs S, add the partials of all the cluster's blocks in rank order
// (deterministic), rounded to dtype as S is stored. The grid is at most as many clusters as fit
// on the GPU at once, so the redundant shrink costs a few r*K reads of A from L2 per cluster,
// not per block.
#include <stdint.h>

#include "block_dot.cuh"
#include "cluster.cuh"
#include "common.cuh"
#include "dtype.cuh"
#include "launchers.cuh"
#include "lora_linear_fwd.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace {

constexpr int kDecodeCols = 4;  // output columns per block and step

#ifdef LORA_OPS_HAS_CLUSTERS

// Ranks a warp of the decode shrink takes at once: their loads of A are in flight together, so
// a rank of r costs ceil(r / (kWarps * G)) dependent load rounds rather than ceil(r / kWarps).
// Fewer for more rows, whose sums hold registers the GEMV that follows also needs.
template <int R>
constexpr int shrink_ranks_per_warp() {
  return R <= 4 ? 4 : (R <= 8 ? 2 : 1);
}

// s_part[m * r + j] = sum over this block's chunk of the depth of drop(x)[m, k] A[j, k], m < M.
// Each warp takes G consecutive ranks at a time, its lanes along the depth; no block
// synchronisation needed.
template <typename T, int R>
__device__ __forceinline__ void shrink_chunk(const FwdArgs& p, unsigned block_rank,
                                             float* s_part) {
  constexpr int V = vec_width<T>();
  constexpr int G = shrink_ranks_per_warp<R>();
  const int nrows = static_cast<int>(p.M);
  const int64_t k_lo = min(p.K, static_cast<int64_t>(block_rank) * p.split_len);
  const int64_t k_hi = min(p.K, k_lo + p.split_len);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const T* x = static_cast<const T*>(p.x);
  const lora_dropout_t drop = seeded(p.dropout);

  for (int64_t j0 = static_cast<int64_t>(warp) * G; j0 < p.r; j0 += kWarps * G) {
    const int ranks = static_cast<int>(min(static_cast<int64_t>(G), p.r - j0));
    const T* a_rows[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      a_rows[g] = static_cast<const T*>(p.a) + (j0 + (g < ranks ? g : 0)) * p.K;
    }
    float acc[G][R] = {};
    if (p.vec_ok) {
      for (int64_t k0 = k_lo + lane * V; k0 < k_hi; k0 += 32 * V) {
        float av[G][V];
#pragma unroll
        for (int g = 0; g < G; ++g) load_vec(a_rows[g], k0, k_hi, av[g]);
#pragma unroll
        for (int m = 0; m < R; ++m) {
          if (m < nrows) {
            float xv[V];
            load_vec(x + m * p.ldx, k0, k_hi, xv);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const float xe = dropout_apply(drop, m, k0 + e, xv[e]);
#pragma unroll
              for (int g = 0; g < G; ++g) acc[g][m] = fmaf(xe, av[g][e], acc[g][m]);
            }
          }
        }
      }
    } else {
      for (int64_t k = k_lo + lane; k < k_hi; k += 32) {
        float av[G];
#pragma unroll
        for (int g = 0; g < G; ++g) av[g] = to_float(a_rows[g][k]);
#pragma unroll
        for (int m = 0; m < R; ++m) {
          if (m < nrows) {
            const float xe = dropout_apply(drop, m, k, to_float(x[m * p.ldx + k]));
#pragma unroll
            for (int g = 0; g < G; ++g) acc[g][m] = fmaf(xe, av[g], acc[g][m]);
          }
        }
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int m = 0; m < R; ++m) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
          acc[g][m] += __shfl_xor_sync(0xffffffffu, acc[g][m], offset);
        }
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int m = 0; m < R; ++m) {
          if (g < ranks && m < nrows) s_part[m * p.r + j0 + g] = acc[g][m];
        }
      }
    }
  }
}

// s_full = S rounded to dtype, from every cluster block's partials in rank order; block 0 of
// the grid also stores it to s_out. Waits for the cluster's partials and then tells the
// cluster this block is done reading them.
template <typename T>
__device__ __forceinline__ void gather_s(const FwdArgs& p, const float* s_part,
                                         float* s_full) {
  cluster_wait();
  const int64_t count = p.M * p.r;
  T* s_out = blockIdx.x == 0 ? static_cast<T*>(p.s_out) : nullptr;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    float v = 0.0f;
#pragma unroll
    for (int c = 0; c < kClusterBlocks; ++c) v += load_peer_shared(s_part + i, c);
    v = round_to<T>(v);
    s_full[i] = v;
    if (s_out != nullptr) s_out[i] = from_float<T>(v);
  }
  __syncthreads();
  cluster_arrive();
}

#endif  // LORA_OPS_HAS_CLUSTERS

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, 2) decode_cluster_kernel(const FwdArgs p) {
#ifdef LORA_OPS_HAS_CLUSTERS
  constexpr int C = kDecodeCols;
  extern __shared__ float dyn_smem[];
  float* s_part = dyn_smem;                // [M][r], this block's chunk of the depth
  float* s_full = dyn_smem + R * p.r;      // [M][r], S rounded to dtype
  __shared__ float red[kWarps * R * C];
  __shared__ float total[R * C];

  // Up to 8 rows the block streams its first W columns before it does its share of the shrink,
  // so the GPU's reads of W start at once and the shrink's latency overlaps other blocks'
  // streaming; with 16 rows the GEMV's sums leave too few registers to hold them across it.
  constexpr bool kShrinkLate = R <= 8;
  if (!kShrinkLate) {
    shrink_chunk<T, R>(p, cluster_block_rank(), s_part);
    cluster_arrive();
  }

  const int nrows = static_cast<int>(p.M);
  const T* w = static_cast<const T*>(p.w);
  const T* lora_b = static_cast<const T*>(p.b);
  const lora_dropout_t no_dropout{0, 0, 1.0f, nullptr};
  const int64_t groups = ceil_div(p.N, C);
  bool have_s = false;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t n0 = g * C;
    const int ncols = static_cast<int>(min(static_cast<int64_t>(C), p.N - n0));
    const T* w_rows[C];
#pragma unroll
    for (int c = 0; c < C; ++c) w_rows[c] = w + (n0 + (c < ncols ? c : 0)) * p.K;
    float acc[R * C] = {};
    block_dot_accumulate<T, R, C>(static_cast<const T*>(p.x), p.ldx, 0, nrows, w_rows, 1, ncols,
                                  p.K, p.vec_ok, no_dropout, acc);
    if (!have_s) {  // uniform over the block: every thread takes the same iterations
      if (kShrinkLate) {
        shrink_chunk<T, R>(p, cluster_block_rank(), s_part);
        cluster_arrive();
      }
      gather_s<T>(p, s_part, s_full);
      have_s = true;
    }
    // Adapter term S[m, :] . B[n, :], the rank split over the block like the depth above.
#pragma unroll
    for (int m = 0; m < R; ++m) {
      if (m >= nrows) continue;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c >= ncols) continue;
        const T* b_row = lora_b + (n0 + c) * p.r;
        float part = 0.0f;
        for (int64_t j = threadIdx.x; j < p.r; j += kThreads) {
          part = fmaf(s_full[m * p.r + j], to_float(b_row[j]), part);
        }
        acc[m * C + c] = fmaf(p.scaling, part, acc[m * C + c]);
      }
    }
    block_sum_store<T, R, C>(acc, red, total, nrows, ncols, n0, p.bias, p.y, p.N);
  }
  if (!have_s) {  // no columns here: the block still does its share, and block 0 stores S
    if (kShrinkLate) {
      shrink_chunk<T, R>(p, cluster_block_rank(), s_part);
      cluster_arrive();
    }
    gather_s<T>(p, s_part, s_full);
  }
  cluster_wait();  // no block leaves while a peer may still read its partials
#else
  __trap();  // launched only where cluster_enabled() holds, i.e. on sm_90+ code
#endif
}

template <typename T, int R>
lora_status_t launch_typed(const FwdArgs& p, cudaStream_t stream, bool* launched) {
  const size_t smem = 2 * sizeof(float) * R * static_cast<size_t>(p.r);
  const auto kernel = decode_cluster_kernel<T, R>;
  const int fit = max_active_clusters(reinterpret_cast<const void*>(kernel), smem);
  if (fit == kNoClusterCode) return LORA_OK;
  if (fit <= 0) return cluster_refused();
  const int64_t wanted = ceil_div(ceil_div(p.N, kDecodeCols), kClusterBlocks);
  const int clusters = static_cast<int>(clamp64(wanted, 1, fit));
  *launched = true;
  return launch_clusters(kernel, clusters, smem, stream, p);
}

}  // namespace

lora_status_t launch_decode_cluster(lora_dtype_t dtype, FwdArgs p, cudaStream_t stream,
                                    bool* launched) {
  *launched = false;
  if (p.M < 1 || p.M > kDecodeClusterMaxRows || p.r < 1 || p.r > kMaxRank || !clusters_enabled()) {
    return LORA_OK;
  }
  const int64_t vec = 16 / dtype_size(dtype);
  p.split_len = round_up(ceil_div(p.K, kClusterBlocks), vec);
  p.vec_ok = rows_vec_ok(dtype, p.x, p.ldx) && rows_vec_ok(dtype, p.w, p.K) &&
             rows_vec_ok(dtype, p.a, p.K);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.M <= 1) return launch_typed<T, 1>(p, stream, launched);
    if (p.M <= 4) return launch_typed<T, 4>(p, stream, launched);
    if (p.M <= 8) return launch_typed<T, 8>(p, stream, launched);
    return launch_typed<T, 16>(p, stream, launched);
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops
