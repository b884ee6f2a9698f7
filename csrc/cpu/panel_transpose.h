// Packing of k-contiguous rows into the k-major panels of the packed GEMM (packed_gemm.h):
//   dst[p * width + r] = rows[r][p]   for r < count, p < kc;   0 for count <= r < width.
// This is the transpose every operand stored along k needs (x, W as x W^T's B, A's rows, ...).
// One element at a time it costs a strided store per element, as much time as the micro-kernel
// spends on the same block at M = 64; 8 x 8 register transposes cost ~0.4 instruction per
// element, so packing W keeps pace with memory.
#ifndef LORA_OPS_CPU_PANEL_TRANSPOSE_H_
#define LORA_OPS_CPU_PANEL_TRANSPOSE_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace lora_ops::cpu {

constexpr int panel_row_pointers(int width) { return (width + 7) / 8 * 8; }

namespace detail {

// The scalar packing of columns p0 .. kc-1 (the whole panel without AVX, the ragged end with).
// Elements are copied as bytes: the rows may be 32-bit words of bf16 pairs at any 2-byte
// address (pack_bf16_pairs_panel), not floats.
inline void transpose_rows_scalar(float* __restrict dst, const float* const* rows, int count,
                                  int width, int64_t p0, int64_t kc) {
  for (int64_t p = p0; p < kc; ++p) {
    float* out = dst + p * width;
    for (int r = 0; r < width; ++r) {
      if (r < count) {
        std::memcpy(out + r, rows[r] + p, sizeof(float));
      } else {
        out[r] = 0.0f;
      }
    }
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

// Lanes [0, lanes) of v at dst, 0 < lanes <= 8 (a panel 6 or 12 wide ends in a partial group
// of 8 rows).
inline void store_lanes(float* dst, __m256 v, int lanes) {
  if (lanes == 8) {
    _mm256_storeu_ps(dst, v);
    return;
  }
  // Eight all-ones words then eight zeros: from 8 - lanes on, the mask of the first `lanes`.
  alignas(32) static const int32_t kMasks[16] = {-1, -1, -1, -1, -1, -1, -1, -1};
  const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMasks + 8 - lanes));
  _mm256_maskstore_ps(dst, mask, v);
}
#endif

}  // namespace detail

// Any width (the micro-kernels' are 6, 12 and 32); count <= width; rows[r] valid for
// r < count, and rows holds panel_row_pointers(width) entries (the 8 x 8 blocks index up to a
// multiple of 8; entries past count are never read).
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

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols: 8 x 8 blocks through
// registers, so that both sides are read and written a vector at a time.
inline void transpose_block(float* __restrict dst, int64_t ld_dst, const float* __restrict src,
                            int64_t ld_src, int64_t rows, int64_t cols) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      __m256 v[8];
      for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_ps(src + (i + r) * ld_src + j);
      detail::transpose8x8(v);
      for (int q = 0; q < 8; ++q) _mm256_storeu_ps(dst + (j + q) * ld_dst + i, v[q]);
    }
    for (; j < cols; ++j) {
      for (int r = 0; r < 8; ++r) dst[j * ld_dst + i + r] = src[(i + r) * ld_src + j];
    }
  }
#endif
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t r = i; r < rows; ++r) dst[j * ld_dst + r] = src[r * ld_src + j];
  }
}

// The same panels for the bf16 dot-product micro-kernel: dst[p * width + r] is the pair of
// elements 2p, 2p + 1 of rows[r] as one 32-bit word (the even element in the low half), for
// p < ceil(kc / 2); an odd kc's last pair has a zero high half. A pair is two adjacent bf16, so
// this is the word transpose above; rows may start at any 2-byte address. width <= 32.
inline void pack_bf16_pairs_panel(uint32_t* __restrict dst, const uint16_t* const* rows,
                                  int count, int width, int64_t kc) {
  const float* words[32] = {};
  for (int r = 0; r < count; ++r) words[r] = reinterpret_cast<const float*>(rows[r]);
  transpose_rows_to_panel(reinterpret_cast<float*>(dst), words, count, width, kc / 2);
  if (kc % 2 != 0) {
    uint32_t* last = dst + kc / 2 * width;
    for (int r = 0; r < width; ++r) last[r] = r < count ? rows[r][kc - 1] : 0u;
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// The same panel, width 32, from a matrix whose columns are the panel's rows: element (p, c) of
// the panel is the pair (src[2p * ld + c], src[(2p + 1) * ld + c]) for c < count (columns past
// count zero), p < ceil(kc / 2), an odd kc's last pair with a zero high half. Two rows of src
// are interleaved 32 columns at a time; masked loads never touch columns past count.
inline void pack_bf16_pairs_interleaved(uint32_t* __restrict dst, const uint16_t* src, int64_t ld,
                                        int count, int64_t kc) {
  const __mmask32 cols = count >= 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
  // unpacklo / unpackhi pair up columns 8l .. 8l+3 / 8l+4 .. 8l+7 of each 128-bit lane l; these
  // put the 64-bit halves of those lanes back in column order.
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t p = 0; 2 * p < kc; ++p) {
    const uint16_t* even = src + 2 * p * ld;
    const __m512i v0 = _mm512_maskz_loadu_epi16(cols, even);
    const __m512i v1 =
        2 * p + 1 < kc ? _mm512_maskz_loadu_epi16(cols, even + ld) : _mm512_setzero_si512();
    const __m512i lo = _mm512_maskz_unpacklo_epi16(~__mmask32{0}, v0, v1);
    const __m512i hi = _mm512_maskz_unpackhi_epi16(~__mmask32{0}, v0, v1);
    _mm512_storeu_si512(dst + p * 32, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(dst + p * 32 + 16, _mm512_permutex2var_epi64(lo, second, hi));
  }
}
#endif

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_PANEL_TRANSPOSE_H_
