// Packing of k-contiguous rows into the k-major panels of the packed GEMM (packed_gemm.h):
//   dst[p * width + r] = rows[r][p]   for r < count, p < kc;   0 for count <= r < width.
// This is the transpose every operand stored along k needs (x, W as x W^T's B, A's rows, ...).
// One element at a time it costs a strided store per element, as much time as the micro-kernel
// spends on the same block at M = 64; 8 x 8 register transposes cost ~0.4 instruction per
// element, so packing W keeps pace with memory.
#ifndef LORA_OPS_CPU_PANEL_TRANSPOSE_H_
#define LORA_OPS_CPU_PANEL_TRANSPOSE_H_

#include <cstdint>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace lora_ops::cpu {

constexpr int panel_row_pointers(int width) { return (width + 7) / 8 * 8; }

namespace detail {

// The scalar packing of columns p0 .. kc-1 (the whole panel without AVX, the ragged end with).
inline void transpose_rows_scalar(float* __restrict dst, const float* const* rows, int count,
                                  int width, int64_t p0, int64_t kc) {
  for (int64_t p = p0; p < kc; ++p) {
    float* out = dst + p * width;
    for (int r = 0; r < width; ++r) out[r] = r < count ? rows[r][p] : 0.0f;
  }
}

#if defined(__AVX__)
// v[q] becomes column q of the 8 x 8 block whose rows were v[0 .. 7].
inline void transpose8x8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Lanes [0, lanes) of v at dst; lanes is 8 or 6.
inline void store_lanes(float* dst, __m256 v, int lanes) {
  if (lanes == 8) {
    _mm256_storeu_ps(dst, v);
    return;
  }
  _mm_storeu_ps(dst, _mm256_castps256_ps128(v));
  _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4), _mm256_extractf128_ps(v, 1));
}
#endif

}  // namespace detail

// width is a multiple of 8, or 6; count <= width; rows[r] valid for r < count, and rows holds
// panel_row_pointers(width) entries (the 8 x 8 blocks index up to a multiple of 8; entries past
// count are never read).
inline void transpose_rows_to_panel(float* __restrict dst, const float* const* rows, int count,
                                    int width, int64_t kc) {
#if defined(__AVX__)
  const int64_t kc8 = kc / 8 * 8;
  for (int g = 0; g < width; g += 8) {
    const int lanes = width - g < 8 ? width - g : 8;
    for (int64_t p = 0; p < kc8; p += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) {
        v[r] = g + r < count ? _mm256_loadu_ps(rows[g + r] + p) : _mm256_setzero_ps();
      }
      detail::transpose8x8(v);
      for (int q = 0; q < 8; ++q) detail::store_lanes(dst + (p + q) * width + g, v[q], lanes);
    }
  }
  detail::transpose_rows_scalar(dst, rows, count, width, kc8, kc);
#else
  detail::transpose_rows_scalar(dst, rows, count, width, 0, kc);
#endif
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_PANEL_TRANSPOSE_H_
