// The dropout mask of lora_ops, bit for bit the same on every backend (CUDA, CPU, Triton and
// the PyTorch reference in lora_ops/reference/dropout.py), so a seed names one mask everywhere
// and the backward pass regenerates it instead of storing it.
//
//   seed32 = low 32 bits of (seed ^ (seed >> 32))     (seed: 64 bits, unsigned)
//   h    = mix32(mix32(row ^ seed32) + col)          (uint32 arithmetic, wrapping)
//   keep = (h >> 8) >= threshold                      threshold = round(p * 2^24)
//
// mix32 is a two-round xorshift-multiply finalizer; both multipliers are below 2^31 so the
// PyTorch reference can run it in int64 without overflow.
#ifndef LORA_OPS_DROPOUT_HASH_H_
#define LORA_OPS_DROPOUT_HASH_H_

#include <stdint.h>

#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD static inline
#endif

#define LORA_MIX32_MUL1 0x7feb352dU
#define LORA_MIX32_MUL2 0x2c1b3c6dU

// The 32 bits of a 64-bit seed the mask depends on.
LORA_HD uint32_t lora_seed32(uint64_t seed) { return (uint32_t)(seed ^ (seed >> 32)); }

LORA_HD uint32_t lora_mix32(uint32_t h) {
  h ^= h >> 16;
  h *= LORA_MIX32_MUL1;
  h ^= h >> 15;
  h *= LORA_MIX32_MUL2;
  h ^= h >> 16;
  return h;
}

LORA_HD uint32_t lora_dropout_bits(uint32_t seed32, uint32_t row, uint32_t col) {
  return lora_mix32(lora_mix32(row ^ seed32) + col);
}

LORA_HD int lora_dropout_keep(uint32_t seed32, uint32_t threshold, uint32_t row, uint32_t col) {
  return (lora_dropout_bits(seed32, row, col) >> 8) >= threshold;
}

#endif  // LORA_OPS_DROPOUT_HASH_H_
