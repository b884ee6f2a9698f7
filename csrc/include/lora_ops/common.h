// Types shared by every lora_ops kernel and by the C ABI. Plain C so that any framework's
// backend can include it; no torch, no CUDA headers.
#ifndef LORA_OPS_COMMON_H_
#define LORA_OPS_COMMON_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lora_dtype {
  LORA_DTYPE_F32 = 0,
  LORA_DTYPE_F16 = 1,
  LORA_DTYPE_BF16 = 2,
  // Not dtypes. They make every int32 a value of the type, so that C++ receives whatever code a
  // C caller passes as a defined value and rejects it (LORA_ERR_UNSUPPORTED), where a value
  // outside the enumerators' range would be undefined behaviour; they also fix its size at 4.
  LORA_DTYPE_RANGE_MIN_ = -2147483647 - 1,
  LORA_DTYPE_RANGE_MAX_ = 2147483647,
} lora_dtype_t;

typedef enum lora_status {
  LORA_OK = 0,
  LORA_ERR_INVALID_ARGUMENT = 1,  // a size, pointer or stride the kernel cannot take
  LORA_ERR_UNSUPPORTED = 2,       // valid input this build cannot run (dtype, rank, slices)
  LORA_ERR_CUDA = 3,              // a CUDA runtime call or launch failed
  LORA_ERR_CUBLAS = 4,            // a cuBLAS call failed
  // Not statuses: every int32 a defined value, as for lora_dtype_t.
  LORA_STATUS_RANGE_MIN_ = -2147483647 - 1,
  LORA_STATUS_RANGE_MAX_ = 2147483647,
} lora_status_t;

// Dropout on the adapter path. `threshold` == 0 means no dropout. An element (row, col) of x is
// kept when (lora_dropout_bits(seed32, row, col) >> 8) >= threshold; kept elements are
// multiplied by keep_scale = 1/(1-p). threshold = round(p * 2^24). See dropout_hash.h.
//
// seed_ptr, when not NULL, replaces seed32: the kernel reads the int64 seed s there as it runs,
// in its own memory space (device memory for the CUDA kernels, host memory for the CPU ones),
// and hashes with the low 32 bits of (u ^ (u >> 32)), u = (uint64_t)s. A CUDA graph that
// captured the kernel then applies on every replay the mask of the value the seed holds at that
// replay (one a captured RNG op drew, say), where seed32 would fix the mask at capture. NULL
// (as a 3-element initializer leaves it): seed32. Not read without dropout (threshold 0).
typedef struct lora_dropout {
  uint32_t seed32;
  uint32_t threshold;
  float keep_scale;
  const int64_t* seed_ptr;
} lora_dropout_t;

// Adapter index of every token for the multi-adapter kernels; exactly one form is set.
//  - per token ("BGMV", decode): token_adapter[M], values in {-1, 0..L-1};
//  - segments ("SGMV", prefill): rows seg_indptr[s] .. seg_indptr[s+1]-1 use seg_adapter[s];
//    seg_indptr[0] == 0, non-decreasing, seg_indptr[num_segments] == M.
// -1 means "no adapter": the token gets no adapter work. Values outside [-1, L) are treated
// as -1 by every kernel (never read out of bounds); the torch layer rejects them on request.
typedef struct lora_adapter_index {
  const int32_t* token_adapter;  // device/host pointer as the kernel's memory space, or NULL
  const int32_t* seg_indptr;     // [num_segments + 1] or NULL
  const int32_t* seg_adapter;    // [num_segments] or NULL
  int64_t num_segments;
} lora_adapter_index_t;

// Packed outputs (q|k|v, gate|up) have up to this many slices.
#define LORA_MAX_SLICES 8

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // LORA_OPS_COMMON_H_
