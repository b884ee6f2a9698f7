// Thread block clusters (sm_90+): what the single-launch forward plans need to let the blocks
// of a cluster share one adapter shrink. A cluster's blocks are co-scheduled by the hardware, so
// one block may wait on its cluster peers without any risk of deadlock, and they exchange
// partial sums through distributed shared memory: no global counters to zero, no extra launch,
// no float atomics (the partials are added in a fixed order, so results stay bitwise
// reproducible), and the launch records into a CUDA graph like any other.
//
// On older GPUs, or with LORA_OPS_CUDA_CLUSTERS=0 in the environment (to test and compare the
// fallback plans on a Hopper GPU), the entry points use their multi-launch plans instead;
// LORA_OPS_CUDA_CLUSTERS=1 makes a picked cluster plan that cannot launch an error.
#ifndef LORA_OPS_CUDA_CLUSTER_CUH_
#define LORA_OPS_CUDA_CLUSTER_CUH_

#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

#include "common.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {

// Blocks per cluster: the portable maximum, so every sm_90 part can schedule it.
constexpr int kClusterBlocks = 8;

// Whether the current device runs cluster launches and they are not switched off.
bool clusters_enabled();

// clusters_enabled(), and this build's code for the device is sm_90+ (the cluster kernels have a
// body): whether the cluster plans can run here at all.
bool clusters_run_here();

// LORA_OPS_CUDA_CLUSTERS=1 (tests): a cluster plan the planner picked that cannot launch (its
// shared memory refused, no cluster fits) fails the call with LORA_ERR_UNSUPPORTED instead of
// falling back, so a plan that never runs cannot pass for one that does.
bool clusters_required();

// What a cluster plan that cannot launch returns: LORA_OK with nothing launched (the caller
// falls back), or the error clusters_required() asks for.
inline lora_status_t cluster_refused() {
  return clusters_required() ? LORA_ERR_UNSUPPORTED : LORA_OK;
}

// How many clusters of kClusterBlocks blocks of `kernel` (with `smem_bytes` of dynamic shared
// memory) the current device holds at once; 0 if it cannot run one (its shared memory refused
// included), kNoClusterCode if this build's code for the device is not sm_90+ (the kernel is a
// stub there). Opts the kernel in to the dynamic shared memory where it needs it. Cached per
// device, kernel and size, so a call's launch path asks the driver nothing after the first.
constexpr int kNoClusterCode = -1;
int max_active_clusters(const void* kernel, size_t smem_bytes);

// A launch of `clusters` clusters of kClusterBlocks consecutive blocks of kThreads threads;
// `attribute` is storage the returned config points to.
inline cudaLaunchConfig_t cluster_launch_config(int clusters, size_t smem_bytes,
                                                cudaStream_t stream,
                                                cudaLaunchAttribute* attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(clusters) * kClusterBlocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = kClusterBlocks;
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// kernel<<<clusters * kClusterBlocks, kThreads, smem_bytes, stream>>>(args), as clusters.
template <typename... KArgs, typename... Args>
lora_status_t launch_clusters(void (*kernel)(KArgs...), int clusters, size_t smem_bytes,
                              cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch_config(clusters, smem_bytes, stream, &attribute);
  if (cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error for the next launch check
    return LORA_ERR_CUDA;
  }
  return launch_status();
}

// Device side. Every thread of every block of the cluster must make the same sequence of
// arrive / wait calls, alternating, from warp-uniform control flow.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LORA_OPS_HAS_CLUSTERS 1

// This block's index within its cluster, [0, kClusterBlocks).
__device__ __forceinline__ unsigned cluster_block_rank() {
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}

// Writes to shared memory made before arrive are visible to cluster peers after their wait.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The float at the same shared-memory address as `local`, in the shared memory of cluster
// block `rank`.
__device__ __forceinline__ float load_peer_shared(const float* local, unsigned rank) {
  const uint32_t local_addr = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t peer_addr;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(peer_addr)
               : "r"(local_addr), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(peer_addr) : "memory");
  return v;
}
#endif

}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_CLUSTER_CUH_
