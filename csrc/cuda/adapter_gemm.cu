// Host side of the adapter-in-GEMM plan: when it applies, and the call into the kernel of the
// call's dtype (adapter_gemm_sm90_{f16,bf16}.cu).
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "adapter_gemm.cuh"
#include "cluster.cuh"
#include "common.cuh"
#include "lora_linear_fwd.cuh"
#include "mma_tile.cuh"
#include "lora_ops/kernels.h"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace sm90 {
lora_status_t run_f16(const AdapterGemmArgs& a, int sm_count, cudaStream_t stream);
lora_status_t run_bf16(const AdapterGemmArgs& a, int sm_count, cudaStream_t stream);
bool runs_here_f16();
bool runs_here_bf16();
bool can_run_f16(const AdapterGemmArgs& a);
bool can_run_bf16(const AdapterGemmArgs& a);
bool built_f16();
bool built_bf16();
}  // namespace sm90

namespace {

// 128 x 256 output tiles (adapter_gemm_sm90.cuh). Below one tile per SM of an H100 (132) the
// persistent kernel leaves SMs idle that cuBLAS's own choice of tiles or split-K would use; below
// one row tile the rows are decode-sized (a wide layer such as an LM head can still have many
// column tiles), where the GEMV and cluster plans stream W without padding M to 128.
constexpr int64_t kTileM = 128, kTileN = 256, kTileK = 64;
constexpr int64_t kMinTiles = 128;

struct DeviceFacts {
  bool known = false;
  bool f16 = false, bf16 = false;
  int sm_count = 0;
};

// What the current device can run, asked once per device; a copy (the table may grow while
// another thread reads its result). known = false if the device could not be asked.
DeviceFacts device_facts() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return DeviceFacts{};
  }
  static std::mutex mutex;
  static std::vector<DeviceFacts> facts;  // per device
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(facts.size())) facts.resize(device + 1);
  DeviceFacts& f = facts[device];
  if (!f.known) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&f.sm_count, cudaDevAttrMultiProcessorCount, device) !=
            cudaSuccess) {
      cudaGetLastError();
      return DeviceFacts{};  // not kept: a failed query is asked again, not taken as "no sm_90"
    }
    f.f16 = major == 9 && sm90::runs_here_f16();
    f.bf16 = major == 9 && sm90::runs_here_bf16();
    f.known = true;
  }
  return f;
}

bool multiple_of_8(int64_t v) { return v % 8 == 0; }

}  // namespace

AdapterGemmMode adapter_gemm_mode() {
  const char* v = std::getenv("LORA_OPS_CUDA_ADAPTER_GEMM");
  if (v != nullptr && std::strcmp(v, "0") == 0) return AdapterGemmMode::kOff;
  if (v != nullptr && std::strcmp(v, "1") == 0) return AdapterGemmMode::kRequired;
  return AdapterGemmMode::kAuto;
}

bool adapter_gemm_shape_ok(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r) {
  const bool built = dtype == LORA_DTYPE_F16    ? sm90::built_f16()
                     : dtype == LORA_DTYPE_BF16 ? sm90::built_bf16()
                                                : false;
  return built && M >= kTileM && N > 0 && K > 0 && r > 0 && multiple_of_8(N) &&
         multiple_of_8(K) && multiple_of_8(r) && M <= INT32_MAX && N <= INT32_MAX &&
         K + r + 2 * kTileK <= INT32_MAX &&  // the kernel's depth, k-tiles rounded up, is an int
         ceil_div(M, kTileM) * ceil_div(N, kTileN) >= kMinTiles;
}

bool adapter_gemm_usable(lora_dtype_t dtype, const AdapterGemmArgs& a) {
  if (!adapter_gemm_shape_ok(dtype, a.M, a.N, a.K, a.r) ||
      adapter_gemm_mode() == AdapterGemmMode::kOff) {
    return false;
  }
  const DeviceFacts f = device_facts();
  if (!(dtype == LORA_DTYPE_F16 ? f.f16 : f.bf16)) return false;
  return rows_vec_ok(dtype, a.x, a.ldx) && rows_vec_ok(dtype, a.s_scaled, a.ld_s_scaled) &&
         is_aligned16(a.w) && is_aligned16(a.b) && is_aligned16(a.y) &&
         (a.bias == nullptr || is_aligned16(a.bias)) &&
         (dtype == LORA_DTYPE_F16 ? sm90::can_run_f16(a) : sm90::can_run_bf16(a));
}

lora_status_t adapter_gemm(lora_dtype_t dtype, const AdapterGemmArgs& a, cudaStream_t stream) {
  const DeviceFacts f = device_facts();
  if (!f.known) return LORA_ERR_CUDA;
  return dtype == LORA_DTYPE_F16 ? sm90::run_f16(a, f.sm_count, stream)
                                 : sm90::run_bf16(a, f.sm_count, stream);
}

}  // namespace detail

bool adapter_gemm_built() { return detail::sm90::built_f16() && detail::sm90::built_bf16(); }

CudaPaths cuda_paths() {
  CudaPaths paths;
  paths.clusters = detail::clusters_run_here();
  paths.mma = detail::mma_enabled();
  const detail::DeviceFacts f = detail::device_facts();
  paths.adapter_gemm = detail::adapter_gemm_mode() != detail::AdapterGemmMode::kOff && f.f16 &&
                       f.bf16;
  return paths;
}

bool adapter_gemm_accepts(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                          bool depth_by_out) {
  using detail::WeightLayout;
  if (!detail::adapter_gemm_shape_ok(dtype, M, N, K, r)) return false;
  if (!depth_by_out && r > detail::kClusterMaxRank) return false;  // the forward's s·S kernel
  detail::AdapterGemmArgs a{};  // no pointers: can_implement reads extents and strides only
  a.M = M;
  a.N = N;
  a.K = K;
  a.r = r;
  a.ldx = K;
  a.ld_s_scaled = detail::adapter_gemm_ld_s(r);
  a.layout = depth_by_out ? WeightLayout::kDepthByOut : WeightLayout::kOutByDepth;
  return dtype == LORA_DTYPE_F16 ? detail::sm90::can_run_f16(a) : detail::sm90::can_run_bf16(a);
}

}  // namespace cuda
}  // namespace lora_ops
