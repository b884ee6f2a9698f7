// Storage types of the CPU kernels and their fp32 conversions. The conversions are branch-free
// bit arithmetic (bit-mask selects, no tables) so that gcc vectorises the packing and store
// loops that call them; float -> half/bfloat16 rounds to nearest even, NaN stays NaN, fp16
// overflow -> inf.
#ifndef LORA_OPS_CPU_DTYPE_H_
#define LORA_OPS_CPU_DTYPE_H_

#include <cstdint>
#include <cstring>

#include "lora_ops/common.h"

namespace lora_ops::cpu {

struct Half {
  uint16_t bits;
};

struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// cond ? a : b as bit arithmetic. Written as a ternary, gcc (with its default -ftrapping-math)
// may sink a floating-point operation feeding one arm into that arm, and then refuses to
// vectorise a loop holding a conditional, possibly trapping, operation.
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp_mant = static_cast<uint32_t>(h & 0x7fffu) << 13;  // fp32 bit positions
  const uint32_t exp = exp_mant & 0x0f800000u;
  const uint32_t normal = exp_mant + ((127u - 15u) << 23);
  const uint32_t inf_nan = exp_mant | 0x7f800000u;
  // A subnormal m * 2^-24 is (1 + m/1024) * 2^-14 - 2^-14: exact, and needs no fp32 denormal
  // (which flush-to-zero modes would destroy).
  const uint32_t subnormal =
      float_bits(bits_float(exp_mant + (113u << 23)) - bits_float(113u << 23));
  const uint32_t magnitude =
      select_bits(exp == 0x0f800000u, inf_nan, select_bits(exp == 0, subnormal, normal));
  return bits_float(magnitude | sign);
}

inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f) & 0x7fffffffu;
  const uint32_t sign = (float_bits(f) >> 16) & 0x8000u;
  // Normal range: rebias the exponent (wrapping add of (15-127) << 23), round the 13 dropped
  // mantissa bits to nearest even; a mantissa carry moves into the exponent, up to inf.
  const uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is subnormal: adding 0.5f puts the fp16 ulp (2^-24) at the last bit
  // of the fp32 mantissa, so the FPU's own round-to-nearest-even does the rounding.
  const uint32_t subnormal = float_bits(bits_float(x) + 0.5f) - 0x3f000000u;
  const uint32_t too_big = select_bits(x > 0x7f800000u, 0x7e00u, 0x7c00u);  // NaN, else inf
  const uint32_t h =
      select_bits(x >= 0x47800000u, too_big, select_bits(x < 0x38800000u, subnormal, normal));
  return static_cast<uint16_t>(h | sign);
}

inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x0040u;  // rounding could carry a NaN into inf
  return static_cast<uint16_t>(select_bits((x & 0x7fffffffu) > 0x7f800000u, quiet_nan, rounded));
}

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return half_to_float(v.bits); }
inline float to_float(BFloat16 v) { return bf16_to_float(v.bits); }

template <class T>
T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline Half from_float<Half>(float f) {
  return Half{float_to_half(f)};
}
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  return BFloat16{float_to_bf16(f)};
}

// Calls fn(T{}) with the storage type of `dtype`; LORA_ERR_INVALID_ARGUMENT for an unknown one.
template <class Fn>
lora_status_t dispatch_dtype(lora_dtype_t dtype, Fn&& fn) {
  switch (dtype) {
    case LORA_DTYPE_F32:
      return fn(float{});
    case LORA_DTYPE_F16:
      return fn(Half{});
    case LORA_DTYPE_BF16:
      return fn(BFloat16{});
    case LORA_DTYPE_RANGE_MIN_:
    case LORA_DTYPE_RANGE_MAX_:
      break;
  }
  return LORA_ERR_INVALID_ARGUMENT;
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_DTYPE_H_
