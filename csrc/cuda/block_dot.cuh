// Dot products of a few rows of x with a few weight rows, the whole block splitting the depth:
// the core of the bandwidth-bound kernels (decode GEMV, shrink). Each thread takes every
// kThreads-th 16-byte vector of the depth, so a block streams each weight row once with
// coalesced 16-byte loads and keeps R + C loads in flight per thread; the per-thread partial
// sums are then added in a fixed order (deterministic).
#ifndef LORA_OPS_CUDA_BLOCK_DOT_CUH_
#define LORA_OPS_CUDA_BLOCK_DOT_CUH_

#include <stdint.h>

#include "common.cuh"
#include "dtype.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {

// acc[r*C + c] += this thread's share of sum_k drop(x)[row0 + r, k] * w[c][k * w_stride] for
// r < nrows, c < ncols, k < K. x rows have stride ldx; dropout is keyed by (row0 + r, k).
// vec_ok: x, ldx, every w[c] 16-byte aligned and w_stride == 1, so whole vectors may be loaded
// (a ragged end of K is still read element by element). Rows and weight rows past nrows and
// ncols are not read; the w[c] for c >= ncols need not point anywhere valid.
template <typename T, int R, int C>
__device__ __forceinline__ void block_dot_accumulate(const T* x, int64_t ldx, int64_t row0,
                                                     int nrows, const T* const (&w)[C],
                                                     int64_t w_stride, int ncols, int64_t K,
                                                     bool vec_ok, const lora_dropout_t& drop,
                                                     float (&acc)[R * C]) {
  constexpr int V = vec_width<T>();
  if (vec_ok) {
    for (int64_t k0 = static_cast<int64_t>(threadIdx.x) * V; k0 < K;
         k0 += static_cast<int64_t>(kThreads) * V) {
      float wv[C][V];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c < ncols) {
          load_vec(w[c], k0, K, wv[c]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) wv[c][e] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          float xv[V];
          load_vec(x + (row0 + r) * ldx, k0, K, xv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xe = dropout_apply(drop, row0 + r, k0 + e, xv[e]);
#pragma unroll
            for (int c = 0; c < C; ++c) acc[r * C + c] = fmaf(xe, wv[c][e], acc[r * C + c]);
          }
        }
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      float wv[C];
#pragma unroll
      for (int c = 0; c < C; ++c) wv[c] = c < ncols ? to_float(w[c][k * w_stride]) : 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          const float xe = dropout_apply(drop, row0 + r, k, to_float(x[(row0 + r) * ldx + k]));
#pragma unroll
          for (int c = 0; c < C; ++c) acc[r * C + c] = fmaf(xe, wv[c], acc[r * C + c]);
        }
      }
    }
  }
}

// total[i] = sum over the block's threads of v[i], in a fixed order. Every thread must call it
// (it synchronises the block); total and red (kWarps * N floats) are shared memory. total is
// readable by all threads on return and stays valid until the next block_sum.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* red, float* total) {
  static_assert(N <= kThreads, "one thread per sum");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[warp * N + i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w * N + threadIdx.x];
    total[threadIdx.x] = s;
  }
  __syncthreads();
}

// The decode GEMVs' epilogue: y[m * ldy + n0 + c] = (sum over the block of acc[m * C + c]) +
// bias[n0 + c] (bias may be NULL) for m < nrows, c < ncols. Every thread must call it.
template <typename T, int R, int C>
__device__ __forceinline__ void block_sum_store(float (&acc)[R * C], float* red, float* total,
                                                int nrows, int ncols, int64_t n0,
                                                const void* bias, void* y, int64_t ldy) {
  block_sum(acc, red, total);
  if (threadIdx.x < nrows * C) {
    const int m = threadIdx.x / C, c = threadIdx.x % C;
    if (c < ncols) {
      const int64_t n = n0 + c;
      const float b = bias != nullptr ? to_float(static_cast<const T*>(bias)[n]) : 0.0f;
      static_cast<T*>(y)[m * ldy + n] = from_float<T>(total[threadIdx.x] + b);
    }
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_BLOCK_DOT_CUH_
