// A tensor-core version of the SIMT tile in tile_gemm.cuh, for fp16 and bf16 operands:
// acc(i, j) += sum_kd P(i, kd) * Q(j, kd) with the products on WMMA m16n16k16 fragments
// (16-bit in, fp32 accumulate), then handed back in the SIMT tile's register layout, so every
// kernel's epilogue (row_of / col_of) stays as it is.
//
// Numerics: each operand value is rounded to T as it is staged. Operands read straight from a
// tensor of dtype T (x, A, B, dY, S) are unchanged by that; the fp32 intermediates (dropped x,
// the split sums of S and dS) are rounded to T, as an eager PyTorch LoRA rounds them between its
// matmuls. Sums are fp32 and in a fixed order (bitwise reproducible on one GPU model).
//
// Why WMMA and not raw mma.sync: its fragment layouts are the compiler's, not ours, so nothing
// here depends on a register layout that has not been checked on a GPU; the price is one pass
// of the fp32 tile through shared memory at the end, small next to the depth loop.
//
// Layout: 8 warps. A 64 x 64 tile is 16 fragments, 2 per warp (same fragment row, so the warp
// loads its P fragment once per step). A 64 x 16 tile is 4 fragments: warps w and w + 4 share
// fragment w % 4 and split each 32-deep stage between them (their sums added in warp order at
// the end), so no warp idles. Code built for sm_80+ only; the host takes it where mma_enabled().
#ifndef LORA_OPS_CUDA_MMA_TILE_CUH_
#define LORA_OPS_CUDA_MMA_TILE_CUH_

#include <mma.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"
#include "dtype.cuh"
#include "tile_gemm.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {

// Whether the tensor-core tiles may run on the current device: code for sm_80+ in this build
// for it, and LORA_OPS_CUDA_MMA not "0" (the switch to the SIMT tiles, for tests and
// comparisons). Host side, in mma_tile.cu.
bool mma_enabled();

// The bits of a 16-bit value, for staging into shared memory declared as raw 16-bit words
// (a union of __half arrays would have no default constructor).
__device__ __forceinline__ uint16_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint16_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T, class Simt>
struct MmaTile {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "tensor-core tiles take fp16 or bf16 operands");
  // The SIMT tile's shape and register layout: the epilogues read acc through these.
  static constexpr int BM = Simt::BM, BN = Simt::BN, TM = Simt::TM, TN = Simt::TN;
  static constexpr int BK = 32;  // depth staged per step
  static constexpr int kFrag = 16;
  static constexpr int kFragCols = BN / kFrag;
  static constexpr int kFrags = (BM / kFrag) * kFragCols;
  // Warps sharing one fragment (each takes a part of every stage's depth), and fragments per
  // warp.
  static constexpr int kKGroups = kFrags >= kWarps ? 1 : kWarps / kFrags;
  static constexpr int kWarpFrags = kFrags * kKGroups / kWarps;
  static constexpr int kKSteps = BK / kFrag / kKGroups;  // 16-deep MMAs per warp per stage
  static_assert(BM % kFrag == 0 && BN % kFrag == 0, "whole fragments");
  static_assert(kFrags * kKGroups % kWarps == 0 && kKSteps * kFrag * kKGroups == BK,
                "every warp gets the same work");
  static_assert(kFragCols % kWarpFrags == 0, "a warp's fragments share their fragment row");
  // Staged rows padded by 8 elements: ldm a multiple of 8 (WMMA), and each 16-row fragment
  // block starts 32-byte aligned (16 * 40 * 2 bytes).
  static constexpr int kLd = BK + 8;
  static constexpr int kOutLd = BN + 4;  // a multiple of 4 floats (WMMA), 32-byte fragment rows

  struct __align__(32) Smem {
    union {
      struct {
        uint16_t p[BM][kLd];
        uint16_t q[BN][kLd];
      } in;
      float out[kKGroups][BM][kOutLd];
    };
  };

  static __device__ __forceinline__ int row_of(int i) { return Simt::row_of(i); }
  static __device__ __forceinline__ int col_of(int j) { return Simt::col_of(j); }

  template <int kRows, Contig kOrder, class F>
  static __device__ __forceinline__ void stage(uint16_t (&s)[kRows][kLd], int64_t kd0,
                                               int64_t kd_end, const F& f) {
    stage_block<BK, kRows, kOrder>(kd0, kd_end, f, [&](int row, int kk, float v) {
      s[row][kk] = bits_of(from_float<T>(v));
    });
  }

  // As tile_gemm: acc += P Q^T over [kd_begin, kd_end); all threads call it; sm reusable after.
  template <Contig kPOrder, Contig kQOrder, class PF, class QF>
  static __device__ __forceinline__ void gemm(Smem& sm, int64_t kd_begin, int64_t kd_end,
                                              const PF& p, const QF& q, float (&acc)[TM * TN]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int kgroup = warp / (kWarps / kKGroups);
    const int frag0 = warp % (kWarps / kKGroups) * kWarpFrags;
    const int frow = frag0 / kFragCols * kFrag, fcol0 = frag0 % kFragCols * kFrag;

    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> c[kWarpFrags];
#pragma unroll
    for (int f = 0; f < kWarpFrags; ++f) wmma::fill_fragment(c[f], 0.0f);
    for (int64_t kd0 = kd_begin; kd0 < kd_end; kd0 += BK) {
      __syncthreads();  // the previous step's fragment loads are done
      stage<BM, kPOrder>(sm.in.p, kd0, kd_end, p);
      stage<BN, kQOrder>(sm.in.q, kd0, kd_end, q);
      __syncthreads();
#pragma unroll
      for (int s = 0; s < kKSteps; ++s) {
        const int kk = (kgroup * kKSteps + s) * kFrag;
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, reinterpret_cast<const T*>(&sm.in.p[frow][kk]), kLd);
#pragma unroll
        for (int f = 0; f < kWarpFrags; ++f) {
          // Q^T as the K x N operand: element (k, n) is q[n][k], i.e. column-major.
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const T*>(&sm.in.q[fcol0 + f * kFrag][kk]),
                                 kLd);
          wmma::mma_sync(c[f], a, b, c[f]);
        }
      }
    }
    __syncthreads();  // `out` overlays the staged operands
#pragma unroll
    for (int f = 0; f < kWarpFrags; ++f) {
      wmma::store_matrix_sync(&sm.out[kgroup][frow][fcol0 + f * kFrag], c[f], kOutLd,
                              wmma::mem_row_major);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        float v = 0.0f;
#pragma unroll
        for (int g = 0; g < kKGroups; ++g) v += sm.out[g][row_of(i)][col_of(j)];
        acc[i * TN + j] += v;
      }
    }
    __syncthreads();
#else
    __trap();  // launched only where mma_enabled() holds, i.e. on sm_80+ code
#endif
  }
};

// The tiles a kernel instance runs on: SIMT for fp32 (as an fp32 matmul without TF32 would)
// or when kMma is false, tensor cores for fp16 / bf16 otherwise.
template <typename T, bool kMma, bool = kMma && !std::is_same<T, float>::value>
struct TileSet {
  using Wide = WideTile;
  using Thin = ThinTile;
};
template <typename T, bool kMma>
struct TileSet<T, kMma, true> {
  using Wide = MmaTile<T, WideTile>;
  using Thin = MmaTile<T, ThinTile>;
};

// f(TileSet<T, true>{}) where the tensor-core tiles can run T, else f(TileSet<T, false>{}).
template <typename T, class F>
lora_status_t dispatch_tiles(F&& f) {
  if (!std::is_same<T, float>::value && mma_enabled()) return f(TileSet<T, true>{});
  return f(TileSet<T, false>{});
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_MMA_TILE_CUH_
