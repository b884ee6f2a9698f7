// Operands of the packed GEMM (packed_gemm.h) over strided matrices of any storage type, with
// the LoRA dropout applied while packing, so drop(x) is never materialised.
//
// A dropout mask is keyed by (row, column) of x. x is A with its rows as A's rows, or B with its
// rows as B's depth (k); both have unit column stride, which is where the mask is vectorised.
#ifndef LORA_OPS_CPU_GEMM_OPERANDS_H_
#define LORA_OPS_CPU_GEMM_OPERANDS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/dtype.h"
#include "cpu/packed_gemm.h"
#include "cpu/panel_transpose.h"
#include "cpu/vec.h"
#include "lora_ops/common.h"
#include "lora_ops/dropout_hash.h"

namespace lora_ops::cpu {

inline constexpr lora_dropout_t kNoDropout = {0u, 0u, 1.0f, nullptr};

// keep ? v : +0.0f, vectorisable (see select_bits).
inline float keep_or_zero(bool keep, float v) {
  return bits_float(select_bits(keep, float_bits(v), 0u));
}

// dst[j] = drop(src[j]) for x[row, col0 + j].
template <class T>
inline void load_span_dropout(float* __restrict dst, const T* __restrict src, int64_t n,
                              const lora_dropout_t& dropout, uint32_t row, uint32_t col0) {
  const uint32_t seed32 = dropout.seed32;
  const uint32_t threshold = dropout.threshold;
  const float keep_scale = dropout.keep_scale;
  // A 32-bit counter: the hash is 32-bit, and a 64-bit one costs a lane shuffle per vector.
  const uint32_t count = static_cast<uint32_t>(n);
  for (uint32_t j = 0; j < count; ++j) {
    const bool keep = lora_dropout_keep(seed32, threshold, row, col0 + j) != 0;
    dst[j] = keep_or_zero(keep, to_float(src[j]) * keep_scale);
  }
}

template <class T>
inline float dropout_value(const T& v, const lora_dropout_t& dropout, int64_t row, int64_t col) {
  if (dropout.threshold == 0) return to_float(v);
  const bool keep = lora_dropout_keep(dropout.seed32, dropout.threshold, static_cast<uint32_t>(row),
                                      static_cast<uint32_t>(col));
  return keep_or_zero(keep, to_float(v) * dropout.keep_scale);
}

// A(i, k) = data[row(i) * stride_i + k * stride_k], row(i) = rows ? rows[i] : i; when dropout is
// on, A's rows are rows of x: the mask is keyed (row(i), k).
template <class T>
struct OperandA {
  using Element = T;

  const T* data;
  int64_t stride_i;
  int64_t stride_k;
  const int64_t* rows = nullptr;
  lora_dropout_t dropout = kNoDropout;

  int64_t row(int64_t i) const { return rows != nullptr ? rows[i] : i; }

  void load_rows(float* __restrict dst, int64_t i, int64_t count, int64_t k0, int64_t kc) const {
    if (stride_i == 1 && stride_k != 1 && rows == nullptr && dropout.threshold == 0) {
      // A transposed matrix (an adapter weight or activation read as its transpose): A's rows
      // are columns of the stored one, read across its rows a block at a time. Element by
      // element along a column, loading lora_b^T's 16 rows cost ~60 us per work item at
      // K = N = 4096.
      const T* src = data + k0 * stride_k + i;
      if constexpr (std::is_same_v<T, float>) {
        transpose_block(dst, kc, src, stride_k, kc, count);
      } else {
        for (int64_t p = 0; p < kc; ++p) {
          for (int64_t r = 0; r < count; ++r) dst[r * kc + p] = to_float(src[p * stride_k + r]);
        }
      }
      return;
    }
    for (int64_t r = 0; r < count; ++r) {
      const int64_t src_row = row(i + r);
      float* out = dst + r * kc;
      if (stride_k != 1) {
        for (int64_t p = 0; p < kc; ++p) {
          out[p] = dropout_value(data[src_row * stride_i + (k0 + p) * stride_k], dropout, src_row,
                                 k0 + p);
        }
      } else if (dropout.threshold != 0) {
        load_span_dropout(out, data + src_row * stride_i + k0, kc, dropout,
                          static_cast<uint32_t>(src_row), static_cast<uint32_t>(k0));
      } else {
        load_span(out, data + src_row * stride_i + k0, kc);
      }
    }
  }

  // Whether pack_bf16_pairs may be used: rows read as stored (T = BFloat16).
  bool packs_bf16_pairs() const { return stride_k == 1 && dropout.threshold == 0; }

  // pack() for micro_kernel_bf16: ceil(kc / 2) x kMR words of bf16 pairs, rows >= count zero.
  void pack_bf16_pairs(uint32_t* __restrict dst, int64_t i, int64_t count, int64_t k0,
                       int64_t kc) const {
    static_assert(std::is_same_v<T, BFloat16>, "bf16 operands only");
    const uint16_t* row_ptr[kMR];
    for (int64_t r = 0; r < count; ++r) row_ptr[r] = &data[row(i + r) * stride_i + k0].bits;
    pack_bf16_pairs_panel(dst, row_ptr, static_cast<int>(count), kMR, kc);
  }

  // A(i .. i+count-1, k0 .. k0+kc-1) as kc x width (k-major), rows >= count zero; width is kMR
  // for the micro-kernel's broadcast operand, kNR for gemm_tile_b_rows' vector operand.
  void pack(float* __restrict dst, int64_t i, int64_t count, int64_t k0, int64_t kc,
            int64_t width = kMR) const {
    if (stride_k == 1) {
      const float* row_ptr[panel_row_pointers(kNR)];
      alignas(64) float staging[kNR * kKC];  // the rows as fp32, when they are not fp32 already
      for (int64_t r = 0; r < count; ++r) {
        row_ptr[r] = nullptr;
        if constexpr (std::is_same_v<T, float>) {
          if (dropout.threshold == 0) row_ptr[r] = data + row(i + r) * stride_i + k0;
        }
        if (row_ptr[r] == nullptr) {
          load_rows(staging + r * kc, i + r, 1, k0, kc);
          row_ptr[r] = staging + r * kc;
        }
      }
      transpose_rows_to_panel(dst, row_ptr, static_cast<int>(count), static_cast<int>(width),
                              kc);
      return;
    }
    if (stride_i == 1 && rows == nullptr && dropout.threshold == 0) {  // a transposed matrix
      for (int64_t p = 0; p < kc; ++p) {
        const T* src = data + (k0 + p) * stride_k + i;
        for (int64_t r = 0; r < width; ++r) {
          dst[p * width + r] = r < count ? to_float(src[r]) : 0.0f;
        }
      }
      return;
    }
    for (int64_t p = 0; p < kc; ++p) {
      for (int64_t r = 0; r < width; ++r) {
        dst[p * width + r] = r < count
                               ? dropout_value(data[row(i + r) * stride_i + (k0 + p) * stride_k],
                                               dropout, row(i + r), k0 + p)
                               : 0.0f;
      }
    }
  }
};

// B(k, j) = data[k * stride_k + j * stride_j]; when dropout is on, B's depth runs over rows of
// x: the mask is keyed (k, j).
template <class T>
struct OperandB {
  using Element = T;

  const T* data;
  int64_t stride_k;
  int64_t stride_j;
  lora_dropout_t dropout = kNoDropout;

  BLayout layout() const {
    if (stride_k == 1 && dropout.threshold == 0) return BLayout::kAlongK;
    return stride_j == 1 ? BLayout::kAlongJ : BLayout::kOther;
  }

  // Streamed access (packed_gemm.h). Row j of B from depth k0, in place: only for kAlongK,
  // which has unit k stride and no dropout.
  const T* along_k(int64_t j, int64_t k0) const { return data + j * stride_j + k0; }

  // Whether rows of B along j may be read in place (along_j), or need load_along_j's copy.
  bool along_j_in_place() const { return dropout.threshold == 0; }

  // Row k of B from column j0, in place: only for kAlongJ when along_j_in_place().
  const T* along_j(int64_t k, int64_t j0) const { return data + k * stride_k + j0; }

  void load_along_j(float* __restrict dst, int64_t k, int64_t j0, int64_t n) const {
    const T* src = data + k * stride_k + j0;
    if (dropout.threshold != 0) {
      load_span_dropout(dst, src, n, dropout, static_cast<uint32_t>(k), static_cast<uint32_t>(j0));
    } else {
      load_span(dst, src, n);
    }
  }

  // Whether pack_bf16_pairs may be used: B along k or along j, read as stored (T = BFloat16).
  bool packs_bf16_pairs() const {
    return dropout.threshold == 0 && (stride_k == 1 || stride_j == 1);
  }

  // pack() for micro_kernel_bf16: panels of ceil(kc / 2) x kNR words of bf16 pairs, panel q at
  // dst + q * kNR * ceil(kc / 2), columns past n zero.
  void pack_bf16_pairs(uint32_t* __restrict dst, int64_t k0, int64_t kc, int64_t j0,
                       int64_t n) const {
    static_assert(std::is_same_v<T, BFloat16>, "bf16 operands only");
    const int64_t pairs = ceil_div(kc, 2);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (stride_k != 1) {  // along j: a pair is two rows of B apart
      for (int64_t jp = 0; jp < n; jp += kNR) {
        pack_bf16_pairs_interleaved(dst + jp * pairs, &data[k0 * stride_k + j0 + jp].bits,
                                    stride_k, static_cast<int>(std::min(kNR, n - jp)), kc);
      }
      return;
    }
#endif
    for (int64_t jp = 0; jp < n; jp += kNR) {
      const int64_t count = std::min(kNR, n - jp);
      const uint16_t* col_ptr[kNR];
      for (int64_t c = 0; c < count; ++c) col_ptr[c] = &data[(j0 + jp + c) * stride_j + k0].bits;
      pack_bf16_pairs_panel(dst + jp * pairs, col_ptr, static_cast<int>(count), kNR, kc);
    }
  }

  // Columns j0 .. j0+n-1 (n <= kMaxTileN) of depth k0 .. k0+kc-1 as consecutive panels of kNR
  // columns (panel q at dst + q * kNR * kc), columns past n zero.
  void pack(float* __restrict dst, int64_t k0, int64_t kc, int64_t j0, int64_t n) const {
    if (stride_j == 1) {
      // Eight rows of B at a time, each read in one run across all panels: panel by panel, the
      // block would be read in kc pieces of kNR columns a row apart (a TLB miss each when rows
      // are long), and a row at a time across the panels writes to kc * kNR-strided addresses
      // that evict one another from L1.
      constexpr int64_t kRows = 8;
      alignas(64) float lines[kRows * kMaxTileN];
      for (int64_t p0 = 0; p0 < kc; p0 += kRows) {
        const int64_t rows = std::min(kRows, kc - p0);
        const float* src[kRows];
        for (int64_t q = 0; q < rows; ++q) {
          src[q] = fp32_along_j(lines + q * n, k0 + p0 + q, j0, n);
        }
        for (int64_t jp = 0; jp < n; jp += kNR) {
          const int64_t cols = std::min(kNR, n - jp);
          for (int64_t q = 0; q < rows; ++q) {
            float* out = dst + jp * kc + (p0 + q) * kNR;
            if (cols == kNR) {
              std::memcpy(out, src[q] + jp, sizeof(float) * kNR);
            } else {
              std::memcpy(out, src[q] + jp, sizeof(float) * cols);
              std::fill(out + cols, out + kNR, 0.0f);
            }
          }
        }
      }
      return;
    }
    for (int64_t jp = 0; jp < n; jp += kNR) {
      pack_panel(dst + jp * kc, k0, kc, j0 + jp, std::min(kNR, n - jp));
    }
  }

 private:
  // Row k of B from j0 as fp32: in place when it is fp32 without dropout, else a copy in dst.
  const float* fp32_along_j(float* __restrict dst, int64_t k, int64_t j0, int64_t n) const {
    if constexpr (std::is_same_v<T, float>) {
      if (dropout.threshold == 0) return data + k * stride_k + j0;
    }
    load_along_j(dst, k, j0, n);
    return dst;
  }

  void load_along_k(float* __restrict dst, int64_t j, int64_t k0, int64_t kc) const {
    load_span(dst, data + j * stride_j + k0, kc);
  }

  void pack_panel(float* __restrict dst, int64_t k0, int64_t kc, int64_t j, int64_t count) const {
    if (stride_k == 1 && dropout.threshold == 0) {
      const float* col_ptr[panel_row_pointers(kNR)];
      alignas(64) float staging[kNR * kKC];  // the columns as fp32, when they are not already
      for (int64_t c = 0; c < count; ++c) {
        if constexpr (std::is_same_v<T, float>) {
          col_ptr[c] = data + (j + c) * stride_j + k0;
        } else {
          load_along_k(staging + c * kc, j + c, k0, kc);
          col_ptr[c] = staging + c * kc;
        }
      }
      transpose_rows_to_panel(dst, col_ptr, static_cast<int>(count), kNR, kc);
      return;
    }
    for (int64_t p = 0; p < kc; ++p) {
      for (int64_t c = 0; c < kNR; ++c) {
        dst[p * kNR + c] = c < count ? dropout_value(data[(k0 + p) * stride_k + (j + c) * stride_j],
                                                     dropout, k0 + p, j + c)
                                     : 0.0f;
      }
    }
  }
};

// out[i * ld + j] = alpha * C(i, j), rounded to T.
template <class T>
struct StoreScaled {
  T* out;
  int64_t ld;
  float alpha;

  void store(int64_t i, int64_t j0, const float* __restrict acc, int64_t n) const {
    T* __restrict o = out + i * ld + j0;
    for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(alpha * acc[j]);
  }
};

// out[j * ld + i] = alpha * C(i, j), rounded to T: C written transposed, for a product computed
// as the transpose of the one wanted so that its narrow side (an adapter's rank) is the GEMM's
// rows, where a rank of 16 does not leave half of the micro-kernel's kNR columns idle. By 8 x 8
// blocks through registers (element by element, transposed stores made the multi-adapter dB take
// twice dA's time).
template <class T>
void store_tile_transposed(T* out, int64_t ld, float alpha, int64_t i0, int64_t m, int64_t j0,
                           int64_t n, const float* __restrict c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (alpha == 1.0f) {
      transpose_block(out + j0 * ld + i0, ld, c, ldc, m, n);
      return;
    }
  }
  alignas(64) float block[8 * kMaxTileM];  // eight columns of C at a time, then a row of out each
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t cols = std::min<int64_t>(8, n - j);
    transpose_block(block, m, c + j, ldc, m, cols);
    for (int64_t q = 0; q < cols; ++q) {
      T* __restrict o = out + (j0 + j + q) * ld + i0;
      const float* __restrict src = block + q * m;
      for (int64_t i = 0; i < m; ++i) o[i] = from_float<T>(alpha * src[i]);
    }
  }
}

template <class T>
struct StoreTransposedScaled {
  T* out;
  int64_t ld;
  float alpha;

  void store_tile(int64_t i0, int64_t m, int64_t j0, int64_t n, const float* c,
                  int64_t ldc) const {
    store_tile_transposed(out, ld, alpha, i0, m, j0, n, c, ldc);
  }
};

// c[i * ldc + j] = C(i, j) + beta * c[i * ldc + j], rounded to T: a plain GEMM's epilogue.
template <class T>
struct StoreGemm {
  T* c;
  int64_t ldc;
  float beta;

  void store(int64_t i, int64_t j0, const float* __restrict acc, int64_t n) const {
    T* __restrict o = c + i * ldc + j0;
    if (beta == 0.0f) {  // C is not read: it may hold anything, NaN included
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(acc[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) o[j] = from_float<T>(acc[j] + beta * to_float(o[j]));
    }
  }
};

// op(b) of a plain GEMM (kernels.h's Gemm): b is [n, k] when b_is_nk, else [k, n].
template <class T>
OperandB<T> gemm_operand_b(const T* b, int64_t ldb, bool b_is_nk) {
  return b_is_nk ? OperandB<T>{b, 1, ldb} : OperandB<T>{b, ldb, 1};
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_GEMM_OPERANDS_H_
