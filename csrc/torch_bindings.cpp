// The lora_ops torch library: op schemas (the multi-adapter ones are added by
// torch_multi_lora.cpp as a fragment) and the Python module lora_ops._C, whose import
// registers everything.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "lora_ops/kernels.h"
#include "torch_common.h"

TORCH_LIBRARY(lora_ops, m) {
  // The dropout seed is a tensor, a one-element int64 tensor (None when dropout_p is 0): on the
  // CPU the launchers read it on the host; on x's device the kernels read it as they run, so a
  // captured CUDA graph follows its value on every replay. As a tensor it can be drawn inside a
  // traced graph (torch.randint, no .item()), where torch.compile keeps it: under activation
  // checkpointing the recompute then re-uses the forward's seed without a graph break, and a
  // backward that autograd saved it for reads the very seed its forward used.
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "float scaling, float dropout_p, Tensor? seed) -> (Tensor y, Tensor s)");
  m.def("lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor s, float scaling, float dropout_p, Tensor? seed, bool[3] output_mask) "
        "-> (Tensor dx, Tensor d_lora_a, Tensor d_lora_b)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef LORA_OPS_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#ifdef LORA_OPS_CUDA_ARCHS
  info["cuda_archs"] = LORA_OPS_CUDA_ARCHS;
#endif
#ifdef LORA_OPS_WITH_CUDA
  info["cuda_adapter_gemm"] = lora_ops::cuda::adapter_gemm_built();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_vector_isa"] = lora_ops::cpu::cpu_vector_isa();
  // Not a build setting but what this machine's ATen matmul runs on, which decides with the
  // above where the CPU kernels hand their base GEMM to it (benchmark records carry it).
  const lora_ops::cpu::BlasTraits& blas = lora_ops::binding::aten_blas_traits();
  pybind11::dict aten_blas;
  aten_blas["mkl_on_intel"] = blas.mkl_on_intel;
  aten_blas["fp16_native"] = blas.fp16_native;
  aten_blas["bf16_amx"] = blas.bf16_amx;
  aten_blas["intel_cpu"] = blas.intel_cpu;
  info["cpu_aten_blas"] = aten_blas;
  return info;
}

#ifdef LORA_OPS_WITH_CUDA
pybind11::dict cuda_paths() {
  const lora_ops::cuda::CudaPaths paths = lora_ops::cuda::cuda_paths();
  pybind11::dict d;
  d["clusters"] = paths.clusters;
  d["mma"] = paths.mma;
  d["adapter_gemm"] = paths.adapter_gemm;
  return d;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lora_ops compiled kernels; importing this module registers the torch.ops.lora_ops ops";
  m.def("build_info", &build_info, "How this library was built");
#ifdef LORA_OPS_WITH_CUDA
  m.def("cuda_paths", &cuda_paths,
        "Which CUDA fast paths run on the current device (cluster plans, tensor-core tiles, "
        "adapter-in-GEMM), with this build's code and the environment switches as they are");
#endif
}
