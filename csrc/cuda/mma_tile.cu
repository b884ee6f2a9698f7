// Host side of mma_tile.cuh: whether the tensor-core tiles can run on the current device.
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "mma_tile.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {

namespace {

// Built with the same architectures as every kernel of the library: the code the runtime picks
// for it on this device is the code it picks for the MMA kernels.
__global__ void mma_probe_kernel() {}

bool switched_off_by_env() {
  const char* v = std::getenv("LORA_OPS_CUDA_MMA");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// Whether this build has sm_80+ code for `device` (not, e.g., compute_75 PTX JIT-compiled for
// it, where the MMA tiles have no body).
bool build_has_mma_code(int device) {
  static std::mutex mutex;
  static std::vector<int> known;  // per device: -1 unknown, 0 no, 1 yes
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(known.size())) known.resize(device + 1, -1);
  if (known[device] < 0) {
    cudaFuncAttributes attributes;
    const bool ok = cudaFuncGetAttributes(&attributes, mma_probe_kernel) == cudaSuccess;
    if (!ok) cudaGetLastError();  // leave no sticky error for the next launch check
    known[device] = ok && attributes.binaryVersion >= 80 && attributes.ptxVersion >= 80;
  }
  return known[device] == 1;
}

}  // namespace

bool mma_enabled() {
  if (switched_off_by_env()) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return build_has_mma_code(device);
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops
