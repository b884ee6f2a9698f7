// Host side of cluster.cuh: whether cluster launches are usable, and how many clusters fit.
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "cluster.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {

namespace {

bool env_is(const char* value) {
  const char* v = std::getenv("LORA_OPS_CUDA_CLUSTERS");
  return v != nullptr && std::strcmp(v, value) == 0;
}

bool switched_off_by_env() { return env_is("0"); }

// Built with the same architectures as the cluster kernels: the code the runtime picks for it
// on this device is the code it picks for them.
__global__ void cluster_probe_kernel() {}

// Opts `kernel` in to `smem_bytes` of dynamic shared memory if it needs it; false if it cannot
// have that much. Without the opt-in a kernel may have 48 KB less its static shared memory (a
// kernel with 17 KB of static tiles is refused 32 KB of dynamic memory), so the kernel's own
// limit is compared, not 48 KB. When raised, the limit goes to all the device allows at once, so
// it never shrinks under a concurrent or captured launch of the same kernel that needed more.
bool opt_in_dynamic_smem(const void* kernel, const cudaFuncAttributes& attributes,
                         size_t smem_bytes, int device) {
  if (smem_bytes <= static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) return true;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    cudaGetLastError();  // leave no sticky error for the next launch check
    return false;
  }
  if (static_cast<size_t>(optin) < attributes.sharedSizeBytes + smem_bytes) return false;
  const int limit = optin - static_cast<int>(attributes.sharedSizeBytes);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

}  // namespace

bool clusters_required() { return env_is("1"); }

bool clusters_run_here() {
  if (!clusters_enabled()) return false;
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, cluster_probe_kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90;
}

bool clusters_enabled() {
  if (switched_off_by_env()) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error for the next launch check
    return false;
  }
  int supported = 0;
  if (cudaDeviceGetAttribute(&supported, cudaDevAttrClusterLaunch, device) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error for the next launch check
    return false;
  }
  return supported != 0;
}

int max_active_clusters(const void* kernel, size_t smem_bytes) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, size_t>, int> cache;  // -> clusters
  const std::tuple<int, const void*, size_t> key{device, kernel, smem_bytes};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch_config(1, smem_bytes, nullptr, &attribute);
  int clusters = 0;
  // The cluster kernels have a body only in code built for sm_90+: a build whose code for this
  // GPU came from older PTX (e.g. TORCH_CUDA_ARCH_LIST=8.0+PTX run on an H100) must not use them.
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    cudaGetLastError();
    clusters = 0;
  } else if (attributes.binaryVersion < 90 || attributes.ptxVersion < 90) {
    clusters = kNoClusterCode;
  } else if (!opt_in_dynamic_smem(kernel, attributes, smem_bytes, device)) {
    clusters = 0;
  } else if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    cudaGetLastError();
    clusters = 0;
  }
  std::lock_guard<std::mutex> lock(mutex);
  cache[key] = clusters;
  return clusters;
}

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops
