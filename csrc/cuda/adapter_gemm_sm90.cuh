// The adapter inside the base GEMM, on Hopper tensor cores (CUTLASS 3: TMA loads, wgmma,
// warp-specialized persistent kernel):
//
//     y[M, N] = x[M, K] W[N, K]^T + sS[M, r] B[N, r]^T + bias[N]        (sS = scaling * S)
//
// as one GEMM whose mainloop runs ceil(K / BK) k-tiles over (x, W) and then ceil(r / BK) more
// over (sS, B), into the same fp32 accumulators; the bias is added in the epilogue and y is
// stored once. Against the 2-launch plans of lora_linear_fwd.cu this removes y_init (written by
// the adapter kernel, read back by cuBLAS as C: 2 M N e bytes) and the adapter's SIMT/WMMA
// expand; the extra k-tile costs r / K of the base FLOPs (~1.6% at r = 64, K = 4096, as one
// padded tile). NOTES.md, "Cost model", item 2.
//
// How: CUTLASS's own sm90 TMA mainloop (CollectiveBuilder) with its load side replaced. The
// kernel is given K' = (k-tiles of K + k-tiles of r) * BK as the problem's depth, so its tile
// scheduler and consumer warps run all k-tiles; the producer (load) sends k-tile k < kt_main to
// the (x, W) TMA descriptors and the rest to the (sS, B) ones. TMA zero-fills past each
// tensor's real extent (K for x and W, r for sS and B), so a ragged K or r adds zeros. The
// consumer (mma) and the epilogue are CUTLASS's, unchanged.
//
// The weights' operands come either as the forward's [N, depth] (W, B) or as the backward's
// [depth, N] (W, A for dX = dY W + dS A): TMA and wgmma take both (WeightLayout).
//
// Requirements (TMA): 16-byte aligned base pointers and row strides, i.e. K, N, r, ldx and
// ld_ss multiples of 8 elements for fp16 / bf16. Checked by adapter_gemm.cu before a launch.
#ifndef LORA_OPS_CUDA_ADAPTER_GEMM_SM90_CUH_
#define LORA_OPS_CUDA_ADAPTER_GEMM_SM90_CUH_

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/numeric_types.h>

#include "adapter_gemm.cuh"

namespace lora_ops {
namespace cuda {
namespace detail {
namespace sm90 {

using namespace cute;

constexpr int kSm90aProbeInts = 64;

// CUTLASS's sm90 TMA warp-specialized mainloop whose producer reads two operand pairs, one
// after the other along the depth. Only what differs from Base is declared here: the arguments
// (a second pair of pointers and strides, and the two depths), the TMA descriptors of the
// second pair, and the load side (load_init, load). mma(), mma_tail() and load_tail() are
// Base's: they see stages of the same shapes whichever pair filled them.
template <class Base>
struct TwoPairMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::DispatchPolicy;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  static constexpr int kBlockK = size<2>(TileShape{});

  struct Arguments {
    ElementA const* ptr_a;   // x [M, depth_main]
    StrideA stride_a;
    ElementB const* ptr_b;   // W [N, depth_main]
    StrideB stride_b;
    ElementA const* ptr_a2;  // sS [M, depth_adapter]
    StrideA stride_a2;
    ElementB const* ptr_b2;  // B [N, depth_adapter]
    StrideB stride_b2;
    int depth_main;
    int depth_adapter;
  };

  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_a2;
    typename Base::Params::TMA_B tma_load_b2;
    int depth_main;
    int depth_adapter;
    int k_tiles_main;
  };

  static int k_tiles(int depth) { return (depth + kBlockK - 1) / kBlockK; }

  // The depth the kernel is told, so that its scheduler and consumers run every k-tile.
  static int scheduled_depth(int depth_main, int depth_adapter) {
    return (k_tiles(depth_main) + k_tiles(depth_adapter)) * kBlockK;
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    (void)K;
    const auto main = Base::to_underlying_arguments(
        make_shape(M, N, args.depth_main, L),
        typename Base::Arguments{args.ptr_a, args.stride_a, args.ptr_b, args.stride_b}, workspace);
    const auto adapter = Base::to_underlying_arguments(
        make_shape(M, N, args.depth_adapter, L),
        typename Base::Arguments{args.ptr_a2, args.stride_a2, args.ptr_b2, args.stride_b2},
        workspace);
    return Params{main, adapter.tma_load_a, adapter.tma_load_b, args.depth_main,
                  args.depth_adapter, k_tiles(args.depth_main)};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    return K == scheduled_depth(args.depth_main, args.depth_adapter) &&
           Base::can_implement(make_shape(M, N, args.depth_main, L),
                               typename Base::Arguments{args.ptr_a, args.stride_a, args.ptr_b,
                                                        args.stride_b}) &&
           Base::can_implement(make_shape(M, N, args.depth_adapter, L),
                               typename Base::Arguments{args.ptr_a2, args.stride_a2, args.ptr_b2,
                                                        args.stride_b2});
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_a2.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_b2.get_tma_descriptor());
  }

  // (gA, gB) tiled over the scheduled depth (the kernel takes its k-tile count from gA), then
  // the two pairs tiled over their own depths.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    using X = Underscore;
    const auto M = get<0>(problem_shape_MNKL), N = get<1>(problem_shape_MNKL);
    const auto K = get<2>(problem_shape_MNKL), L = get<3>(problem_shape_MNKL);
    auto tile_a = [&](auto const& tma, int depth) {
      return local_tile(tma.get_tma_tensor(make_shape(M, depth, L)), TileShape{},
                        make_coord(_, _, _), Step<_1, X, _1>{});  // (BLK_M, BLK_K, m, k, l)
    };
    auto tile_b = [&](auto const& tma, int depth) {
      return local_tile(tma.get_tma_tensor(make_shape(N, depth, L)), TileShape{},
                        make_coord(_, _, _), Step<X, _1, _1>{});  // (BLK_N, BLK_K, n, k, l)
    };
    return cute::make_tuple(tile_a(params.tma_load_a, K), tile_b(params.tma_load_b, K),
                            tile_a(params.tma_load_a, params.depth_main),
                            tile_b(params.tma_load_b, params.depth_main),
                            tile_a(params.tma_load_a2, params.depth_adapter),
                            tile_b(params.tma_load_b2, params.depth_adapter));
  }

  // Producer: k-tile k of this output tile from (x, W) while k < k_tiles_main, else tile
  // k - k_tiles_main from (sS, B). Multicast masks as Base computes them.
  template <class... Tensors, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write,
                           cute::tuple<Tensors...> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                           int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    (void)thread_idx;
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});

    using ClusterShape = typename DispatchPolicy::ClusterShape;
    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    const uint2 in_cluster = {block_rank_in_cluster % cluster_x,
                              block_rank_in_cluster / cluster_x};
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    (void)k_coord;

    auto slice_a = params.tma_load_a.get_slice(in_cluster.y);
    auto slice_b = params.tma_load_b.get_slice(in_cluster.x);
    auto slice_a2 = params.tma_load_a2.get_slice(in_cluster.y);
    auto slice_b2 = params.tma_load_b2.get_slice(in_cluster.x);
    Tensor tAgA = slice_a.partition_S(get<2>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tBgB = slice_b.partition_S(get<3>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAgA2 = slice_a2.partition_S(get<4>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tBgB2 = slice_b2.partition_S(get<5>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tAsA = slice_a.partition_D(sA);
    Tensor tBsB = slice_b.partition_D(sB);

    uint16_t mcast_mask_a = 0;
    uint16_t mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};  // (m, n) -> block id
      for (int n = 0; n < size<1>(block_layout); ++n) {
        mcast_mask_a |= uint16_t(1) << block_layout(in_cluster.x, n, Int<0>{});
      }
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= uint16_t(1) << block_layout(m, in_cluster.y, Int<0>{});
      }
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k_tile = static_cast<int>(*k_tile_iter);
      if (k_tile < params.k_tiles_main) {
        copy(params.tma_load_a.with(*barrier, mcast_mask_a), tAgA(_, _, _, k_tile),
             tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(*barrier, mcast_mask_b), tBgB(_, _, _, k_tile),
             tBsB(_, _, _, stage));
      } else {
        const int k2 = k_tile - params.k_tiles_main;
        copy(params.tma_load_a2.with(*barrier, mcast_mask_a), tAgA2(_, _, _, k2),
             tAsA(_, _, _, stage));
        copy(params.tma_load_b2.with(*barrier, mcast_mask_b), tBgB2(_, _, _, k2),
             tBsB(_, _, _, stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

// The kernel for element type E (cutlass::half_t or cutlass::bfloat16_t) and weight layout L:
// 128 x 256 x 64 tiles, clusters of 2 along M (W tiles multicast to both blocks), cooperative
// (2 consumer warp groups), fp32 accumulation, y = acc + bias (bias may be null).
template <typename E, WeightLayout L>
struct AdapterGemm {
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  using LayoutA = cutlass::layout::RowMajor;  // x, sS: [M, depth], depth contiguous
  // W, B as [N, depth] with depth contiguous (CUTLASS's column-major K x N), or as [depth, N]
  // with N contiguous (row-major K x N).
  using LayoutB = std::conditional_t<L == WeightLayout::kOutByDepth, cutlass::layout::ColumnMajor,
                                     cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;     // y [M, N]
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<E>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, E,
      LayoutD, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinCombPerColBias<E, float, E, E, float>>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, LayoutA, kAlign, E, LayoutB, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Mainloop = TwoPairMainloop<BaseMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The stride of a dense weight operand of `depth` x N (kDepthByOut) or N x `depth`.
template <WeightLayout L, class StrideB>
StrideB weight_stride(int64_t N, int64_t depth) {
  if constexpr (L == WeightLayout::kOutByDepth) {
    return StrideB{depth, _1{}, 0};
  } else {
    return StrideB{_1{}, N, 0};
  }
}

// CUTLASS's arguments for a call.
template <typename E, WeightLayout L>
typename AdapterGemm<E, L>::Device::Arguments gemm_arguments(const AdapterGemmArgs& a,
                                                             int sm_count) {
  using G = AdapterGemm<E, L>;
  using StrideA = typename G::Kernel::StrideA;
  using StrideB = typename G::Kernel::StrideB;
  using StrideD = typename G::Kernel::StrideD;
  const int K = static_cast<int>(a.K), r = static_cast<int>(a.r);

  typename G::Mainloop::Arguments mainloop{
      static_cast<const E*>(a.x),        StrideA{a.ldx, _1{}, 0},
      static_cast<const E*>(a.w),        weight_stride<L, StrideB>(a.N, a.K),
      static_cast<const E*>(a.s_scaled), StrideA{a.ld_s_scaled, _1{}, 0},
      static_cast<const E*>(a.b),        weight_stride<L, StrideB>(a.N, a.r),
      K, r};
  typename G::Device::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(a.M), static_cast<int>(a.N),
                        G::Mainloop::scheduled_depth(K, r), 1};
  args.mainloop = mainloop;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<const E*>(a.bias);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = StrideD{a.N, _1{}, 0};
  args.epilogue.ptr_D = static_cast<E*>(a.y);
  args.epilogue.dD = StrideD{a.N, _1{}, 0};
  if (cudaGetDevice(&args.hw_info.device_id) != cudaSuccess) {
    cudaGetLastError();  // no GPU (a host-only can_implement check): leave no sticky error
    args.hw_info.device_id = 0;
  }
  args.hw_info.sm_count = sm_count;
  return args;
}

// Whether CUTLASS takes the call (alignment, extents) with no workspace: asked before the plan
// launches anything, so that a call it would refuse takes the other plans instead.
template <typename E, WeightLayout L>
bool can_run(const AdapterGemmArgs& a) {
  using Device = typename AdapterGemm<E, L>::Device;
  const auto args = gemm_arguments<E, L>(a, 1);
  return Device::can_implement(args) == cutlass::Status::kSuccess &&
         Device::get_workspace_size(args) == 0;
}

template <typename E, WeightLayout L>
lora_status_t run(const AdapterGemmArgs& a, int sm_count, cudaStream_t stream) {
  const auto args = gemm_arguments<E, L>(a, sm_count);
  typename AdapterGemm<E, L>::Device gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return LORA_ERR_CUDA;
  return gemm.run(stream) == cutlass::Status::kSuccess ? LORA_OK : LORA_ERR_CUDA;
}

// Has a body only in code built with sm_90a's features (wgmma, setmaxnreg), which CUTLASS's
// kernel needs: built for plain sm_90 (TORCH_CUDA_ARCH_LIST=9.0), that kernel compiles to a
// printf and would leave y unwritten. The body's static shared memory makes the difference
// visible to cudaFuncGetAttributes, without a launch.
namespace {  // one per file that includes this header (f16 and bf16 each ask their own)
__global__ void sm90a_features_probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[kSm90aProbeInts];
  marker[threadIdx.x % kSm90aProbeInts] = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (out != nullptr) *out = marker[0];
#else
  (void)out;
#endif
}
}  // namespace

// Whether this build's code for the current device can run the kernel of E with layout L:
// sm_90a code (an sm_90 device); the host side of adapter_gemm.cu asks once per device.
template <typename E, WeightLayout L>
bool kernel_runs_here() {
  cudaFuncAttributes kernel, probe;
  if (cudaFuncGetAttributes(&kernel, cutlass::device_kernel<typename AdapterGemm<E, L>::Kernel>) !=
          cudaSuccess ||
      cudaFuncGetAttributes(&probe, sm90a_features_probe) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return kernel.binaryVersion == 90 &&
         probe.sharedSizeBytes >= kSm90aProbeInts * sizeof(int);
}

}  // namespace sm90
}  // namespace detail
}  // namespace cuda
}  // namespace lora_ops

#endif  // LORA_OPS_CUDA_ADAPTER_GEMM_SM90_CUH_
