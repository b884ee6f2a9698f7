// Host-side argument checks shared by the CPU and CUDA entry points: each answers "may the
// kernel run on this?", so both backends accept and reject exactly the same inputs.
#ifndef LORA_OPS_COMMON_ARG_CHECKS_H_
#define LORA_OPS_COMMON_ARG_CHECKS_H_

#include <stdint.h>

namespace lora_ops::args {

// A pointer is needed only when it addresses at least one element (empty tensors may be NULL).
inline bool present(const void* p, int64_t elements) { return p != nullptr || elements == 0; }

// Rows must not overlap; a single row may have any stride.
inline bool row_stride_ok(int64_t ld, int64_t rows, int64_t cols) {
  return rows <= 1 || ld >= cols;
}

inline bool non_negative(int64_t a, int64_t b = 0, int64_t c = 0, int64_t d = 0) {
  return a >= 0 && b >= 0 && c >= 0 && d >= 0;
}

// Slices lie in [0, limit) (limit < 0: no upper bound but int64's) and do not overlap.
inline bool slices_valid(const int64_t* offset, const int64_t* width, int64_t num_slices,
                         int64_t limit) {
  if (offset == nullptr || width == nullptr) return false;
  const int64_t bound = limit >= 0 ? limit : INT64_MAX;
  for (int64_t s = 0; s < num_slices; ++s) {
    if (offset[s] < 0 || width[s] < 0) return false;
    // offset + width <= bound, without computing a sum that could overflow (an offset near
    // 2**63 wrapped the end negative and passed); every end below is then exact.
    if (offset[s] > bound - width[s]) return false;
    for (int64_t u = 0; u < s; ++u) {
      const bool disjoint = offset[s] + width[s] <= offset[u] || offset[u] + width[u] <= offset[s];
      if (!disjoint && width[s] > 0 && width[u] > 0) return false;
    }
  }
  return true;
}

// The expand's slices of y: they must tile the fused layer's N when n_exact >= 0, else fit in a
// row of y, whose rows are ldy apart (a single row: any width). A negative ldy for several
// rows would have the slices write before y.
inline bool expand_slices_valid(const int64_t* offset, const int64_t* width, int64_t num_slices,
                                int64_t M, int64_t ldy, int64_t n_exact) {
  if (n_exact >= 0) return slices_valid(offset, width, num_slices, n_exact);
  if (M <= 1) return slices_valid(offset, width, num_slices, -1);
  return ldy >= 0 && slices_valid(offset, width, num_slices, ldy);
}

}  // namespace lora_ops::args

#endif  // LORA_OPS_COMMON_ARG_CHECKS_H_
