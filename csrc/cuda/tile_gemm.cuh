// A block-level fp32 SIMT GEMM tile: acc(i, j) = sum_kd P(i, kd) * Q(j, kd) over a range of
// the depth kd, for a BM x BN tile, each thread holding a TM x TN register micro-tile. P and Q
// are read through small "operand" functors (below), so the same tile code serves every
// compute-bound product of the forward and backward passes, whatever layout, transposition,
// dropout or split-sum the operand has. Operands return 0 outside their bounds; the tile never
// asks for kd outside [kd_begin, kd_end).
#ifndef LORA_OPS_CUDA_TILE_GEMM_CUH_
#define LORA_OPS_CUDA_TILE_GEMM_CUH_

#include <stdint.h>

#include "common.cuh"
#include "dtype.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {

// Which way an operand is contiguous in memory: along kd (x[m][k] read as P(m, k)) or along its
// row index (dY[m][n] read as P(n, m)). It picks the thread map of the staging loads so that
// neighbouring threads read neighbouring addresses.
enum class Contig { kKd, kRow };

// Loads the block's operand values for depth [kd0, kd0 + BK) of rows [0, kRows), 0 past
// kd_end, and hands each to put(row, kk, value). The thread map follows the operand's
// contiguous direction, so neighbouring threads read neighbouring addresses.
template <int BK, int kRows, Contig kOrder, class F, class Put>
__device__ __forceinline__ void stage_block(int64_t kd0, int64_t kd_end, const F& f,
                                            const Put& put) {
  for (int idx = threadIdx.x; idx < kRows * BK; idx += kThreads) {
    int row, kk;
    if (kOrder == Contig::kRow) {
      row = idx % kRows;
      kk = idx / kRows;
    } else {
      kk = idx % BK;
      row = idx / BK;
    }
    const int64_t kd = kd0 + kk;
    put(row, kk, kd < kd_end ? f(row, kd) : 0.0f);
  }
}

template <int BK, int kRows, Contig kOrder, class F>
__device__ __forceinline__ void stage_operand(float (&s)[BK][kRows + 4], int64_t kd0,
                                              int64_t kd_end, const F& f) {
  stage_block<BK, kRows, kOrder>(kd0, kd_end, f,
                                 [&](int row, int kk, float v) { s[kk][row] = v; });
}

template <int BM_, int BN_, int TM_, int TN_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, TM = TM_, TN = TN_, BK = 16;
  static constexpr int kColThreads = BN / TN;
  static_assert((BM / TM) * (BN / TN) == kThreads, "one micro-tile per thread");
  static_assert(TM % 4 == 0, "P is read from shared memory as float4");

  // Rows padded to keep every row 16-byte aligned for the float4 reads of P.
  struct __align__(16) Smem {
    float p[BK][BM + 4];
    float q[BK][BN + 4];
  };

  // Tile coordinates of this thread's acc[i * TN + j].
  static __device__ __forceinline__ int row_of(int i) {
    return static_cast<int>(threadIdx.x) / kColThreads * TM + i;
  }
  static __device__ __forceinline__ int col_of(int j) {
    return static_cast<int>(threadIdx.x) % kColThreads * TN + j;
  }

  // acc += P Q^T over kd in [kd_begin, kd_end) (see tile_gemm below).
  template <Contig kPOrder, Contig kQOrder, class PF, class QF>
  static __device__ __forceinline__ void gemm(Smem& sm, int64_t kd_begin, int64_t kd_end,
                                              const PF& p, const QF& q, float (&acc)[TM * TN]) {
    const int row0 = row_of(0), col0 = col_of(0);
    for (int64_t kd0 = kd_begin; kd0 < kd_end; kd0 += BK) {
      __syncthreads();  // the previous step's reads of sm are done
      stage_operand<BK, BM, kPOrder>(sm.p, kd0, kd_end, p);
      stage_operand<BK, BN, kQOrder>(sm.q, kd0, kd_end, q);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; i += 4) {
          const float4 v = *reinterpret_cast<const float4*>(&sm.p[kk][row0 + i]);
          a[i] = v.x;
          a[i + 1] = v.y;
          a[i + 2] = v.z;
          a[i + 3] = v.w;
        }
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = sm.q[kk][col0 + j];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i * TN + j] = fmaf(a[i], b[j], acc[i * TN + j]);
        }
      }
    }
    __syncthreads();
  }
};

// 64 x 64 for products whose BN side is wide; 64 x 16 for a BN side that is a rank <= 16, so a
// small rank does not pay for 64 columns. mma_tile.cuh has their tensor-core twins.
using WideTile = Tile<64, 64, 4, 4>;
using ThinTile = Tile<64, 16, 4, 1>;

// acc += P Q^T over kd in [kd_begin, kd_end), on tile type Tl (SIMT here, or MmaTile). Every
// thread of the block must call it; sm may be reused by the caller as soon as it returns.
template <class Tl, Contig kPOrder, Contig kQOrder, class PF, class QF>
__device__ __forceinline__ void tile_gemm(typename Tl::Smem& sm, int64_t kd_begin, int64_t kd_end,
                                          const PF& p, const QF& q,
                                          float (&acc)[Tl::TM * Tl::TN]) {
  Tl::template gemm<kPOrder, kQOrder>(sm, kd_begin, kd_end, p, q, acc);
}

// ---- Operands: (row, kd) -> fp32 value, 0 outside the matrix. ----

// m[(i0 + row) * ld + kd] for i0 + row < rows: a row-major matrix read along its rows.
template <typename T>
struct RowsOf {
  const T* m;
  int64_t ld, i0, rows;
  __device__ float operator()(int row, int64_t kd) const {
    const int64_t i = i0 + row;
    return i < rows ? to_float(m[i * ld + kd]) : 0.0f;
  }
};

// m[kd * ld + i0 + row] for i0 + row < cols: a row-major matrix read down its columns.
template <typename T>
struct ColsOf {
  const T* m;
  int64_t ld, i0, cols;
  __device__ float operator()(int row, int64_t kd) const {
    const int64_t i = i0 + row;
    return i < cols ? to_float(m[kd * ld + i]) : 0.0f;
  }
};

// drop(x)[m0 + row, kd] (kTransposed false) or drop(x)[kd, m0 + row] (true): dropout keyed by
// (row of x, column of x) whichever way x is read.
template <typename T, bool kTransposed>
struct DroppedX {
  const T* x;
  int64_t ldx, i0, limit;  // limit: M (rows of x) or K (columns of x), whichever `row` indexes
  lora_dropout_t drop;
  __device__ float operator()(int row, int64_t kd) const {
    const int64_t i = i0 + row;
    if (i >= limit) return 0.0f;
    const int64_t xr = kTransposed ? kd : i, xc = kTransposed ? i : kd;
    return dropout_apply(drop, xr, xc, to_float(x[xr * ldx + xc]));
  }
};

// Element (i, j) of a [rows, cols] fp32 matrix stored as `splits` partial sums
// part[(s * rows + i) * cols + j], added in order s = 0, 1, ... (deterministic); read with
// i = i0 + row, j = kd (kTransposed false) or i = kd, j = i0 + row (true).
template <bool kTransposed>
struct SplitSum {
  const float* part;
  int64_t rows, cols, i0;
  int splits;
  __device__ float at(int64_t i, int64_t j) const {
    float s = 0.0f;
    for (int k = 0; k < splits; ++k) s += part[(k * rows + i) * cols + j];
    return s;
  }
  __device__ float operator()(int row, int64_t kd) const {
    const int64_t i = kTransposed ? kd : i0 + row;
    const int64_t j = kTransposed ? i0 + row : kd;
    return (i < rows && j < cols) ? at(i, j) : 0.0f;
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_TILE_GEMM_CUH_
