// Autocast for the layer ops. Inside a torch.autocast region on CPU or CUDA, the matmul operands
// of lora_linear_fwd, multi_lora_linear_fwd and multi_lora_shrink are cast to the region's dtype
// before the op runs, as F.linear's are: LoRALinear and MultiLoRALinear stay drop-ins for
// nn.Linear under mixed-precision training (fp32 parameters, bf16 or fp16 compute, and inputs
// that earlier autocast layers left in bf16 or fp16). Without this the ops would refuse x in bf16
// next to an fp32 weight, and would run fp32 inputs in fp32 where nn.Linear runs bf16.
//
// The casts are autocast's own (at::autocast::cached_cast: a trainable fp32 leaf, the adapter
// weights, is cast once per region, not per call) and are recorded by autograd, which runs below
// autocast: gradients come back to fp32 parameters in fp32. multi_lora_expand is left alone: it
// writes into y in place, whose dtype is the caller's (autocast casts no in-place op either).
// The Python functions do the same for the reference and Triton backends (lora_ops/autocast.py).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace lora_ops::binding {
namespace {

// The arguments autocast casts, by their schema names: the matmuls' floating operands. Not
// `scalings` (the kernels take them in fp32, like a linear's fp32 scale), and the integer ranks
// and indices are no floating tensors.
bool is_matmul_operand(const std::string& name) {
  return name == "x" || name == "weight" || name == "bias" || name == "lora_a" ||
         name == "lora_b";
}

// A boxed kernel, so that one body serves every op whatever its signature: casts the operands in
// place on the stack, then calls the op again with this device type's autocast switched off.
template <c10::DeviceType device>
void autocast_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    if (!is_matmul_operand(args[i].name())) continue;
    c10::IValue& arg = (*stack)[first + i];
    if (arg.isTensor()) {
      arg = at::autocast::cached_cast(dtype, arg.toTensor(), device);
    } else if (arg.isTensorList()) {
      // As a TensorList: a std::vector would pick cached_cast's pass-through template for
      // non-tensor arguments, and nothing would be cast.
      const std::vector<at::Tensor> stacks = arg.toTensorVector();
      arg = at::autocast::cached_cast(dtype, at::TensorList(stacks), device);
    }  // an absent bias (None) stays None
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

template <c10::DeviceType device>
void register_autocast(torch::Library& m) {
  for (const char* op : {"lora_linear_fwd", "multi_lora_linear_fwd", "multi_lora_shrink"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<device>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ops, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }

TORCH_LIBRARY_IMPL(lora_ops, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace lora_ops::binding
