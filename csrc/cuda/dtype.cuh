// Element types on the device: conversions to and from fp32 (the accumulation type of every
// kernel) and 16-byte vector loads. Only the explicit intrinsics are used, because torch builds
// with __CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__ and the operator switches.
#ifndef LORA_OPS_CUDA_DTYPE_CUH_
#define LORA_OPS_CUDA_DTYPE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "lora_ops/dropout_hash.h"

namespace lora_ops {
namespace cuda {
namespace detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v as a tensor of dtype T would hold it.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float (&f)[vec_width<T>()]);

template <>
__device__ __forceinline__ void unpack16<float>(const uint4& u, float (&f)[4]) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}

template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// bf16 is the upper half of an fp32: widening is a shift.
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// f[e] = p[k0 + e] for the vec_width<T>() elements from k0, as fp32; elements at or past `end`
// read as 0 and are not touched. A whole in-range vector is one 16-byte load, so p + k0 must
// then be 16-byte aligned (the callers decide that once per kernel: base pointer and leading
// dimension aligned, k0 a multiple of the width).
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t k0, int64_t end,
                                         float (&f)[vec_width<T>()]) {
  constexpr int V = vec_width<T>();
  if (k0 + V <= end) {
    unpack16<T>(__ldg(reinterpret_cast<const uint4*>(p + k0)), f);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = k0 + e < end ? to_float(p[k0 + e]) : 0.0f;
  }
}

// The descriptor with its seed in seed32. A seed in device memory (seed_ptr) is read here, as
// the kernel runs, so that each replay of a captured CUDA graph uses the value the seed holds
// then. Kernels call this once, before their loops; without dropout nothing is read.
__device__ __forceinline__ lora_dropout_t seeded(lora_dropout_t d) {
  if (d.threshold != 0 && d.seed_ptr != nullptr) {
    d.seed32 = lora_seed32(static_cast<uint64_t>(__ldg(d.seed_ptr)));
  }
  d.seed_ptr = nullptr;
  return d;
}

// Dropout of element (row, col) of x applied to v (see dropout_hash.h); no-op without dropout.
// d should be seeded(); one that is not still gets its seed right, at a load per element.
__device__ __forceinline__ float dropout_apply(const lora_dropout_t& d, int64_t row, int64_t col,
                                               float v) {
  if (d.threshold == 0) return v;
  const uint32_t seed32 =
      d.seed_ptr != nullptr ? lora_seed32(static_cast<uint64_t>(__ldg(d.seed_ptr))) : d.seed32;
  return lora_dropout_keep(seed32, d.threshold, static_cast<uint32_t>(row),
                           static_cast<uint32_t>(col))
             ? v * d.keep_scale
             : 0.0f;
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_DTYPE_CUH_
