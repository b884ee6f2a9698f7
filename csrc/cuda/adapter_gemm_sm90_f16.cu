// The adapter-in-GEMM kernel for fp16 (one dtype per translation unit: each takes ~1 min of nvcc).
#include "adapter_gemm_sm90_entry.cuh"

LORA_OPS_ADAPTER_GEMM_ENTRY(f16, cutlass::half_t)
