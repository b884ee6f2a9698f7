// The fp32 vector type of the CPU kernels (GCC vector extension, one full register of the widest
// vector unit the build targets) and its loads from every storage type.
//
// Loads from fp16 and bf16 widen in registers (F16C / AVX-512 vcvtph2ps; a zero-extend and shift
// for bf16), so a kernel can stream a half-precision matrix at its own size instead of first
// writing an fp32 copy and reading that back. Each widening is exact and gives the same value as
// to_float() in dtype.h; vcvtph2ps converts fp16 subnormals exactly whatever MXCSR's DAZ says.
#ifndef LORA_OPS_CPU_VEC_H_
#define LORA_OPS_CPU_VEC_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/dtype.h"

namespace lora_ops::cpu {

#if defined(__AVX512F__)
inline constexpr int kVecLen = 16;
#elif defined(__AVX__)
inline constexpr int kVecLen = 8;
#else
inline constexpr int kVecLen = 4;
#endif
typedef float VecF __attribute__((vector_size(kVecLen * sizeof(float))));

inline VecF fmadd(VecF a, VecF b, VecF c) {
#if defined(__FMA__) && defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__) && defined(__AVX__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// The scalar twin of fmadd: fused exactly where the vector one is, so that a vector loop and its
// scalar tail round alike.
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <size_t... Lane>
inline VecF broadcast_lanes(float s, std::index_sequence<Lane...>) {
  return VecF{(static_cast<void>(Lane), s)...};
}

inline VecF broadcast(float s) { return broadcast_lanes(s, std::make_index_sequence<kVecLen>{}); }

// kVecLen consecutive elements from p (any alignment) as fp32.
inline VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline VecF load_vec(const Half* p) {
#if defined(__AVX512F__)
  // The zero-masked form with every lane selected is plain vcvtph2ps; the unmasked intrinsic's
  // "undefined" passthrough trips gcc 12's -Wmaybe-uninitialized.
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_maskz_cvtph_ps(static_cast<__mmask16>(0xffff), bits);
#elif defined(__AVX__) && defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  VecF v;
  for (int lane = 0; lane < kVecLen; ++lane) v[lane] = half_to_float(p[lane].bits);
  return v;
#endif
}

// bf16 is the top half of fp32: zero-extend each lane to 32 bits and shift it up (vpmovzxwd and
// vpslld on AVX2 / AVX-512), written with vector extensions, which every target compiles.
inline VecF load_vec(const BFloat16* p) {
  typedef uint16_t VecU16 __attribute__((vector_size(kVecLen * sizeof(uint16_t))));
  typedef uint32_t VecU32 __attribute__((vector_size(kVecLen * sizeof(uint32_t))));
  VecU16 bits;
  std::memcpy(&bits, p, sizeof bits);
  const VecU32 wide = __builtin_convertvector(bits, VecU32) << 16;
  return (VecF)wide;  // a vector cast between vectors of one size reinterprets the bits
}

inline void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }

// How far ahead of a streamed operand's loads prefetch_ahead asks for its cache line. The
// hardware prefetcher follows a stream only within a 4 KB page and ramps up again after each
// crossing, which the 6-8 weight rows a decode product streams at once hit every 64 lines; a
// software prefetch a few lines ahead carries them across. Against no prefetch (C ABI A/B, both
// builds on the same buffers, weight rotated through 10 copies so it comes from memory, 2
// threads, K = N = 4096): fwd fp32 0.99 / 0.90 / 0.99 / 0.93 at M = 1 / 4 / 8 / 16, bf16 / fp16
// 0.92 / 0.89 at M = 1; bwd fp32 1.01 / 0.89 / 0.91 at M = 1 / 8 / 16 (mixed for bf16 and fp16
// there: 0.9-1.1 between runs). 512 B ahead did better than 256 or 2048 at M = 4 and 12.
inline constexpr uintptr_t kStreamPrefetchBytes = 512;

// A read prefetch of the line kStreamPrefetchBytes past p. Never faults, so it may point past the
// operand's end; the address is formed as an integer for the same reason.
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) +
                                                   kStreamPrefetchBytes),
                     0, 3);
}

// prefetch_ahead for the vector at element i of a stream of T, once per 64-byte line: a
// half-precision vector is half a line, and a second prefetch of the line only takes a load slot.
template <class T>
inline void prefetch_stream(const T* stream, int64_t i) {
  constexpr int64_t kLine = 64;
  if (sizeof(T) * kVecLen >= kLine || (i * static_cast<int64_t>(sizeof(T))) % kLine == 0) {
    prefetch_ahead(stream + i);
  }
}

// Whether load_span widens T through load_vec rather than leaving a scalar to_float loop to
// gcc's vectoriser: only for fp16, whose vcvtph2ps gcc does not derive from half_to_float's bit
// arithmetic (measured in an earlier dY W loop: the scalar loop took 2x the time at M = 4); for
// fp32 and bf16 (a shift) the vectorised scalar loop was the faster there (the explicit one took
// 1.15x at M = 16). The register-blocked passes (scale_rows_into) widen through load_vec always.
template <class T>
inline constexpr bool kWidenExplicitly = std::is_same_v<T, Half>;

// dst[j] = to_float(src[j]), j < n.
template <class T>
inline void load_span(float* __restrict dst, const T* __restrict src, int64_t n) {
  int64_t j = 0;
  if constexpr (kWidenExplicitly<T>) {
    for (; j + kVecLen <= n; j += kVecLen) store_vec(dst + j, load_vec(src + j));
  }
  for (; j < n; ++j) dst[j] = to_float(src[j]);
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_VEC_H_
