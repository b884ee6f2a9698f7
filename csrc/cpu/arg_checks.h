// Argument checks shared by the CPU entry points: each answers "may the kernel run on this?".
#ifndef LORA_OPS_CPU_ARG_CHECKS_H_
#define LORA_OPS_CPU_ARG_CHECKS_H_

#include <cstdint>

namespace lora_ops::cpu {

// A pointer is needed only when it addresses at least one element (empty tensors may be NULL).
inline bool present(const void* p, int64_t elements) { return p != nullptr || elements == 0; }

// Rows must not overlap; a single row may have any stride.
inline bool row_stride_ok(int64_t ld, int64_t rows, int64_t cols) {
  return rows <= 1 || ld >= cols;
}

inline bool non_negative(int64_t a, int64_t b = 0, int64_t c = 0, int64_t d = 0) {
  return a >= 0 && b >= 0 && c >= 0 && d >= 0;
}

}  // namespace lora_ops::cpu

#endif  // LORA_OPS_CPU_ARG_CHECKS_H_
