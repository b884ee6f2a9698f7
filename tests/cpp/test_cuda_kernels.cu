// Every lora_ops::cuda entry point against naive double-precision loops on the host: odd shapes
// (M in {0, 1, 7, 8, 9, 133} and a large-M case, N and K like 33, 100, 256), ranks 1 to 512,
// fp32 / fp16 / bf16, dropout on and off, rows of x with padded and misaligned strides, both
// adapter-index forms with -1 and out-of-range adapters, heterogeneous ranks with NaN stored
// past every rank, 1 or 3 packed slices, unit-stride and transposed adapter stacks, and the
// backward pass with every output mask. Outputs are poisoned (NaN bytes) before each call and
// padding around inputs holds NaN, so a kernel that skips a write or reads out of bounds fails.
// The kernels are also checked to be bitwise deterministic (each call runs twice) and, for one
// case of each op, to replay correctly from a captured CUDA graph (no sync or allocation inside).
//
// Inputs are small multiples of 1/64, exact in every dtype, so the oracle sees the very values
// the kernel sees. A result passes when |got - want| <= tol, with tol built from the magnitudes
// of the terms of that output: the dtype's rounding of the output, of any stored intermediate
// and of the fp32 operands that tensor-core tiles round to dtype (dropped x, dS), plus a
// worst-case fp32 accumulation bound over the depth.
//
// Prints a line per case and exits 0 when all pass, 1 on any failure, 77 (ctest's skip code)
// when no CUDA device is present. Built with -DLORA_TEST_CPU_BACKEND and linked with csrc/cpu,
// it first runs the same cases against lora_ops::cpu on host memory, which checks this harness
// itself on machines without a GPU.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lora_ops/dropout_hash.h"
#include "lora_ops/kernels.h"

namespace {

using lora_ops::AdapterStack;

const double kU32 = std::ldexp(1.0, -24);  // fp32 unit roundoff

// ---------------------------------------------------------------------------------------------
// dtypes on the host

size_t dtype_size(lora_dtype_t d) { return d == LORA_DTYPE_F32 ? 4 : 2; }

const char* dtype_name(lora_dtype_t d) {
  return d == LORA_DTYPE_F32 ? "f32" : d == LORA_DTYPE_F16 ? "f16" : "bf16";
}

// Relative spacing of the dtype: rounding to it moves a value by at most half of this times
// its magnitude, and two roundings of nearby values differ by at most this.
double dtype_eps(lora_dtype_t d) {
  return d == LORA_DTYPE_F32 ? std::ldexp(1.0, -23)
                             : d == LORA_DTYPE_F16 ? std::ldexp(1.0, -10) : std::ldexp(1.0, -7);
}

double round_to(lora_dtype_t d, double v) {
  switch (d) {
    case LORA_DTYPE_F16:
      return __half2float(__float2half_rn(static_cast<float>(v)));
    case LORA_DTYPE_BF16:
      return __bfloat162float(__float2bfloat16_rn(static_cast<float>(v)));
    default:
      return static_cast<float>(v);
  }
}

std::vector<unsigned char> encode(const std::vector<double>& v, lora_dtype_t d) {
  std::vector<unsigned char> out(v.size() * dtype_size(d));
  for (size_t i = 0; i < v.size(); ++i) {
    const float f = static_cast<float>(v[i]);
    if (d == LORA_DTYPE_F32) {
      std::memcpy(&out[4 * i], &f, 4);
    } else if (d == LORA_DTYPE_F16) {
      const __half h = __float2half_rn(f);
      std::memcpy(&out[2 * i], &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(f);
      std::memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

std::vector<double> decode(const std::vector<unsigned char>& bytes, lora_dtype_t d) {
  std::vector<double> out(bytes.size() / dtype_size(d));
  for (size_t i = 0; i < out.size(); ++i) {
    if (d == LORA_DTYPE_F32) {
      float f;
      std::memcpy(&f, &bytes[4 * i], 4);
      out[i] = f;
    } else if (d == LORA_DTYPE_F16) {
      __half h;
      std::memcpy(&h, &bytes[2 * i], 2);
      out[i] = __half2float(h);
    } else {
      __nv_bfloat16 h;
      std::memcpy(&h, &bytes[2 * i], 2);
      out[i] = __bfloat162float(h);
    }
  }
  return out;
}

const double kNaN = std::numeric_limits<double>::quiet_NaN();

// Multiples of 1/64 in [-1, 1]: exact in fp16 and bf16, and their products exact in fp32.
struct Rng {
  std::mt19937 gen;
  explicit Rng(uint32_t seed) : gen(seed) {}
  double value() { return static_cast<double>(static_cast<int>(gen() % 129) - 64) / 64.0; }
  int below(int n) { return static_cast<int>(gen() % static_cast<uint32_t>(n)); }
  std::vector<double> values(size_t n) {
    std::vector<double> v(n);
    for (double& e : v) e = value();
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// Results

int g_cases = 0;
int g_failed_cases = 0;
std::string g_current_case;  // named when a CUDA error ends the run

// Collects the comparisons of one case; prints one line for it.
class CaseCheck {
 public:
  explicit CaseCheck(std::string name) : name_(std::move(name)) { g_current_case = name_; }

  void status(lora_status_t got, const char* call) {
    if (got != LORA_OK) fail(std::string(call) + " returned status " + std::to_string(got));
  }

  // got must be within tol of want (exactly equal when tol is 0); NaN always fails.
  void value(const char* what, size_t index, double got, double want, double tol) {
    ++values_;
    const double err = std::fabs(got - want);
    if (!(err <= tol)) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s[%zu]: got %.9g want %.9g (tol %.3g)", what, index, got,
                    want, tol);
      fail(buf);
    } else if (tol > 0) {
      worst_ = std::max(worst_, err / tol);
    }
  }

  void expect(bool ok, const std::string& what) {
    if (!ok) fail(what);
  }

  ~CaseCheck() {
    ++g_cases;
    if (failures_ > 0) ++g_failed_cases;
    std::printf("%s %s: %zu values, worst err/tol %.2f%s%s\n", failures_ ? "FAIL" : "ok  ",
                name_.c_str(), values_, worst_, failures_ ? " -- " : "", first_.c_str());
    if (failures_ > 1) std::printf("     (%d failures in this case)\n", failures_);
  }

 private:
  void fail(const std::string& what) {
    if (failures_++ == 0) first_ = what;
  }

  std::string name_;
  std::string first_;
  int failures_ = 0;
  size_t values_ = 0;
  double worst_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Backends: where buffers live and which entry points run.

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void download(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill(void* p, int byte, size_t bytes) = 0;
  virtual bool deterministic() const = 0;

  virtual lora_status_t fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                            const void* x, int64_t ldx, const void* weight, const void* bias,
                            const void* lora_a, const void* lora_b, float scaling,
                            lora_dropout_t dropout, void* s_out, void* y) = 0;
  virtual lora_status_t bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                            const void* dy, const void* x, int64_t ldx, const void* weight,
                            const void* lora_a, const void* lora_b, const void* s_saved,
                            float scaling, lora_dropout_t dropout, void* dx, void* d_lora_a,
                            void* d_lora_b) = 0;
  virtual lora_status_t shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L,
                               int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                               const AdapterStack* lora_a, const float* scalings,
                               const int32_t* ranks, lora_adapter_index_t index, float* t) = 0;
  virtual lora_status_t expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                               int64_t num_slices, const float* t, const AdapterStack* lora_b,
                               const int64_t* slice_offset, const int64_t* slice_width,
                               const int32_t* ranks, lora_adapter_index_t index, void* y,
                               int64_t ldy) = 0;
  virtual lora_status_t linear(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L,
                               int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                               const void* weight, const void* bias, const AdapterStack* lora_a,
                               const AdapterStack* lora_b, const int64_t* slice_offset,
                               const int64_t* slice_width, const float* scalings,
                               const int32_t* ranks, lora_adapter_index_t index,
                               float* t_workspace, void* y) = 0;
};

[[noreturn]] void die(const char* what, const char* detail) {
  std::fprintf(stderr, "test_cuda_kernels: %s: %s (in case: %s)\n", what, detail,
               g_current_case.c_str());
  std::exit(1);
}

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) die(what, cudaGetErrorString(e));
}

class CudaBackend : public Backend {
 public:
  CudaBackend() {
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) die("cublasCreate", "failed");
    // A workspace of our own, so cuBLAS needs no allocation during graph capture.
    cuda_ok(cudaMalloc(&cublas_workspace_, kCublasWorkspace), "cudaMalloc");
    if (cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspace) !=
        CUBLAS_STATUS_SUCCESS) {
      die("cublasSetWorkspace", "failed");
    }
  }
  ~CudaBackend() override {
    cublasDestroy(cublas_);
    cudaFree(cublas_workspace_);
    cudaFree(workspace_);
    cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }
  void* alloc(size_t bytes) override {
    void* p = nullptr;
    if (bytes > 0) cuda_ok(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
  }
  void release(void* p) override { cudaFree(p); }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) cuda_ok(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "upload");
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) cuda_ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "download");
  }
  // Synchronous, so the fill is done before the (non-blocking) test stream runs anything.
  void fill(void* p, int byte, size_t bytes) override {
    if (bytes == 0) return;
    cuda_ok(cudaMemset(p, byte, bytes), "cudaMemset");
    cuda_ok(cudaDeviceSynchronize(), "cudaMemset");
  }
  bool deterministic() const override { return true; }

  // While on, each entry point call is recorded into a CUDA graph, which is then replayed once.
  void set_capture(bool on) { capture_ = on; }
  // While on, the calls get no cuBLAS handle (NULL, as the C ABI allows where none is needed).
  void set_without_cublas(bool on) { without_cublas_ = on; }

  lora_status_t fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                    const void* x, int64_t ldx, const void* weight, const void* bias,
                    const void* lora_a, const void* lora_b, float scaling,
                    lora_dropout_t dropout, void* s_out, void* y) override {
    const lora_ops::cuda::Context ctx =
        context(lora_ops::cuda::lora_linear_fwd_workspace_bytes(dtype, M, N, K, r));
    return run([&] {
      return lora_ops::cuda::lora_linear_fwd(dtype, M, N, K, r, x, ldx, weight, bias, lora_a,
                                             lora_b, scaling, dropout, s_out, y, ctx);
    });
  }
  lora_status_t bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                    const void* dy, const void* x, int64_t ldx, const void* weight,
                    const void* lora_a, const void* lora_b, const void* s_saved, float scaling,
                    lora_dropout_t dropout, void* dx, void* d_lora_a, void* d_lora_b) override {
    const lora_ops::cuda::Context ctx =
        context(lora_ops::cuda::lora_linear_bwd_workspace_bytes(dtype, M, N, K, r));
    return run([&] {
      return lora_ops::cuda::lora_linear_bwd(dtype, M, N, K, r, dy, x, ldx, weight, lora_a,
                                             lora_b, s_saved, scaling, dropout, dx, d_lora_a,
                                             d_lora_b, ctx);
    });
  }
  lora_status_t shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L, int64_t r_max,
                       int64_t num_slices, const void* x, int64_t ldx, const AdapterStack* lora_a,
                       const float* scalings, const int32_t* ranks, lora_adapter_index_t index,
                       float* t) override {
    const lora_ops::cuda::Context ctx = context(0);
    return run([&] {
      return lora_ops::cuda::multi_lora_shrink(dtype, M, K, L, r_max, num_slices, x, ldx, lora_a,
                                               scalings, ranks, index, t, ctx);
    });
  }
  lora_status_t expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                       int64_t num_slices, const float* t, const AdapterStack* lora_b,
                       const int64_t* slice_offset, const int64_t* slice_width,
                       const int32_t* ranks, lora_adapter_index_t index, void* y,
                       int64_t ldy) override {
    const lora_ops::cuda::Context ctx = context(0);
    return run([&] {
      return lora_ops::cuda::multi_lora_expand(dtype, M, L, r_max, num_slices, t, lora_b,
                                               slice_offset, slice_width, ranks, index, y, ldy,
                                               ctx);
    });
  }
  lora_status_t linear(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L,
                       int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                       const void* weight, const void* bias, const AdapterStack* lora_a,
                       const AdapterStack* lora_b, const int64_t* slice_offset,
                       const int64_t* slice_width, const float* scalings, const int32_t* ranks,
                       lora_adapter_index_t index, float* t_workspace, void* y) override {
    const lora_ops::cuda::Context ctx = context(
        lora_ops::cuda::multi_lora_linear_fwd_workspace_bytes(dtype, M, N, K, r_max, num_slices));
    return run([&] {
      return lora_ops::cuda::multi_lora_linear_fwd(
          dtype, M, N, K, L, r_max, num_slices, x, ldx, weight, bias, lora_a, lora_b,
          slice_offset, slice_width, scalings, ranks, index, t_workspace, y, ctx);
    });
  }

 private:
  static constexpr size_t kCublasWorkspace = 32u << 20;

  // A context whose workspace has the size asked for; NaN bytes in it, since the kernels must
  // not rely on its contents.
  lora_ops::cuda::Context context(size_t workspace_bytes) {
    if (workspace_bytes > workspace_capacity_) {
      cudaFree(workspace_);
      workspace_ = alloc(workspace_bytes);
      workspace_capacity_ = workspace_bytes;
    }
    if (workspace_bytes > 0) fill(workspace_, 0xff, workspace_bytes);
    return lora_ops::cuda::Context{stream_, without_cublas_ ? nullptr : cublas_,
                                   workspace_bytes ? workspace_ : nullptr, workspace_bytes};
  }

  // Runs call() on the stream (or records and replays it as a graph), waits, and turns any
  // asynchronous error into a test failure.
  template <class F>
  lora_status_t run(F&& call) {
    lora_status_t status;
    if (capture_) {
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      cuda_ok(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "begin capture");
      status = call();
      cuda_ok(cudaStreamEndCapture(stream_, &graph), "end capture (a call broke the capture)");
      cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
      cuda_ok(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch");
      cuda_ok(cudaStreamSynchronize(stream_), "graph replay");
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    } else {
      status = call();
    }
    cuda_ok(cudaStreamSynchronize(stream_), "kernel execution");
    cuda_ok(cudaGetLastError(), "kernel launch");
    return status;
  }

  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_capacity_ = 0;
  bool capture_ = false;
  bool without_cublas_ = false;
};

#ifdef LORA_TEST_CPU_BACKEND
class CpuBackend : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  void* alloc(size_t bytes) override { return bytes ? std::malloc(bytes) : nullptr; }
  void release(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void fill(void* p, int byte, size_t bytes) override {
    if (bytes) std::memset(p, byte, bytes);
  }
  bool deterministic() const override { return false; }

  lora_status_t fwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                    const void* x, int64_t ldx, const void* weight, const void* bias,
                    const void* lora_a, const void* lora_b, float scaling,
                    lora_dropout_t dropout, void* s_out, void* y) override {
    return lora_ops::cpu::lora_linear_fwd(dtype, M, N, K, r, x, ldx, weight, bias, lora_a,
                                          lora_b, scaling, dropout, s_out, y,
                                          lora_ops::cpu::builtin_gemm());
  }
  lora_status_t bwd(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t r,
                    const void* dy, const void* x, int64_t ldx, const void* weight,
                    const void* lora_a, const void* lora_b, const void* s_saved, float scaling,
                    lora_dropout_t dropout, void* dx, void* d_lora_a, void* d_lora_b) override {
    return lora_ops::cpu::lora_linear_bwd(dtype, M, N, K, r, dy, x, ldx, weight, lora_a, lora_b,
                                          s_saved, scaling, dropout, dx, d_lora_a, d_lora_b,
                                          lora_ops::cpu::builtin_gemm());
  }
  lora_status_t shrink(lora_dtype_t dtype, int64_t M, int64_t K, int64_t L, int64_t r_max,
                       int64_t num_slices, const void* x, int64_t ldx, const AdapterStack* lora_a,
                       const float* scalings, const int32_t* ranks, lora_adapter_index_t index,
                       float* t) override {
    return lora_ops::cpu::multi_lora_shrink(dtype, M, K, L, r_max, num_slices, x, ldx, lora_a,
                                            scalings, ranks, index, t);
  }
  lora_status_t expand(lora_dtype_t dtype, int64_t M, int64_t L, int64_t r_max,
                       int64_t num_slices, const float* t, const AdapterStack* lora_b,
                       const int64_t* slice_offset, const int64_t* slice_width,
                       const int32_t* ranks, lora_adapter_index_t index, void* y,
                       int64_t ldy) override {
    return lora_ops::cpu::multi_lora_expand(dtype, M, L, r_max, num_slices, t, lora_b,
                                            slice_offset, slice_width, ranks, index, y, ldy);
  }
  lora_status_t linear(lora_dtype_t dtype, int64_t M, int64_t N, int64_t K, int64_t L,
                       int64_t r_max, int64_t num_slices, const void* x, int64_t ldx,
                       const void* weight, const void* bias, const AdapterStack* lora_a,
                       const AdapterStack* lora_b, const int64_t* slice_offset,
                       const int64_t* slice_width, const float* scalings, const int32_t* ranks,
                       lora_adapter_index_t index, float* t_workspace, void* y) override {
    return lora_ops::cpu::multi_lora_linear_fwd(dtype, M, N, K, L, r_max, num_slices, x, ldx,
                                                weight, bias, lora_a, lora_b, slice_offset,
                                                slice_width, scalings, ranks, index,
                                                t_workspace, y, lora_ops::cpu::builtin_gemm());
  }
};
#endif

// A buffer of a backend: raw bytes, or a dtype tensor read and written as doubles.
class Buf {
 public:
  Buf(Backend& be, size_t bytes) : be_(&be), bytes_(bytes), ptr_(be.alloc(bytes)) {}
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { be_->release(ptr_); }

  void* ptr() const { return ptr_; }
  template <typename E>
  E* as() const {
    return static_cast<E*>(ptr_);
  }
  void upload_bytes(const void* src) { be_->upload(ptr_, src, bytes_); }
  void poison() { be_->fill(ptr_, 0xff, bytes_); }
  std::vector<unsigned char> bytes_back() const {
    std::vector<unsigned char> out(bytes_);
    be_->download(out.data(), ptr_, bytes_);
    return out;
  }

 private:
  Backend* be_;
  size_t bytes_;
  void* ptr_;
};

std::unique_ptr<Buf> tensor(Backend& be, const std::vector<double>& v, lora_dtype_t d) {
  auto buf = std::make_unique<Buf>(be, v.size() * dtype_size(d));
  const std::vector<unsigned char> bytes = encode(v, d);
  buf->upload_bytes(bytes.data());
  return buf;
}

template <typename E>
std::unique_ptr<Buf> raw(Backend& be, const std::vector<E>& v) {
  auto buf = std::make_unique<Buf>(be, v.size() * sizeof(E));
  buf->upload_bytes(v.data());
  return buf;
}

std::vector<double> read_tensor(const Buf& buf, lora_dtype_t d) {
  return decode(buf.bytes_back(), d);
}

// x of [M, K] stored with row stride ldx after `offset` elements; NaN everywhere else.
enum class XLayout { kDense, kPadded, kMisaligned };

const char* layout_name(XLayout l) {
  return l == XLayout::kDense ? "dense" : l == XLayout::kPadded ? "padded" : "misaligned";
}

struct StoredX {
  std::unique_ptr<Buf> buf;
  const void* ptr;
  int64_t ldx;
};

StoredX store_x(Backend& be, const std::vector<double>& x, int64_t M, int64_t K, XLayout layout,
                lora_dtype_t d) {
  const int64_t offset = layout == XLayout::kMisaligned ? 1 : 0;
  const int64_t ldx = layout == XLayout::kDense ? K : layout == XLayout::kPadded ? K + 8 : K + 3;
  std::vector<double> v(static_cast<size_t>(offset + M * ldx + 8), kNaN);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) v[offset + m * ldx + k] = x[m * K + k];
  }
  StoredX out;
  out.buf = tensor(be, v, d);
  out.ptr = static_cast<const unsigned char*>(out.buf->ptr()) + offset * dtype_size(d);
  out.ldx = ldx;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Single adapter

struct Dropout {
  lora_dropout_t params;
  // Whether a call passes the seed in memory (seed_ptr: device memory for the CUDA kernels), an
  // int64 whose fold is params.seed32, with a wrong seed32 beside it that the kernels must ignore.
  bool seed_in_memory = false;
  bool on() const { return params.threshold != 0; }
  // The descriptor a call passes; *holder keeps the seed's memory alive until the call is done.
  lora_dropout_t for_call(Backend& be, std::unique_ptr<Buf>* holder) const {
    if (!seed_in_memory) return params;
    const uint64_t high = 0x9e3779b9u;  // any high half: the fold xors it out again
    const int64_t seed = static_cast<int64_t>((high << 32) | (params.seed32 ^ high));
    *holder = raw(be, std::vector<int64_t>{seed});
    lora_dropout_t d = params;
    d.seed32 = ~params.seed32;
    d.seed_ptr = (*holder)->as<const int64_t>();
    return d;
  }
  // drop(x)[m, k] / x[m, k], as the kernels apply it (keep_scale in fp32).
  double factor(int64_t m, int64_t k) const {
    if (!on()) return 1.0;
    return lora_dropout_keep(params.seed32, params.threshold, static_cast<uint32_t>(m),
                             static_cast<uint32_t>(k))
               ? static_cast<double>(params.keep_scale)
               : 0.0;
  }
};

Dropout with_seed_in_memory(Dropout d) {
  d.seed_in_memory = true;
  return d;
}

Dropout make_dropout(double p, uint32_t seed) {
  if (p == 0) return Dropout{lora_dropout_t{seed, 0, 1.0f, nullptr}};
  return Dropout{lora_dropout_t{seed, static_cast<uint32_t>(std::lround(p * 16777216.0)),
                                static_cast<float>(1.0 / (1.0 - p)), nullptr}};
}

struct LinearShape {
  int64_t M, N, K, r;
};

std::string linear_name(const char* op, lora_dtype_t d, const LinearShape& s, const Dropout& drop,
                        XLayout layout, const char* extra) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s M=%lld N=%lld K=%lld r=%lld dropout=%d%s x=%s%s", op,
                dtype_name(d), static_cast<long long>(s.M), static_cast<long long>(s.N),
                static_cast<long long>(s.K), static_cast<long long>(s.r), drop.on() ? 1 : 0,
                drop.seed_in_memory ? " (seed in memory)" : "", layout_name(layout), extra);
  return buf;
}

void test_fwd(Backend& be, lora_dtype_t d, const LinearShape& s, const Dropout& drop,
              XLayout layout, bool with_bias, Rng& rng) {
  const int64_t M = s.M, N = s.N, K = s.K, r = s.r;
  CaseCheck check(linear_name("lora_linear_fwd", d, s, drop, layout, with_bias ? "" : " no-bias"));
  const float scaling = 0.75f;
  const std::vector<double> x = rng.values(M * K), w = rng.values(N * K), a = rng.values(r * K),
                            b = rng.values(N * r), bias = rng.values(N);
  StoredX xs = store_x(be, x, M, K, layout, d);
  auto w_buf = tensor(be, w, d);
  auto a_buf = tensor(be, a, d);
  auto b_buf = tensor(be, b, d);
  auto bias_buf = tensor(be, bias, d);
  Buf s_buf(be, M * r * dtype_size(d)), y_buf(be, M * N * dtype_size(d));

  // Oracle: S rounded to dtype, as stored; y from that S.
  std::vector<double> s_ref(M * r), s_mag(M * r);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double term = x[m * K + k] * drop.factor(m, k) * a[j * K + k];
        acc += term;
        mag += std::fabs(term);
      }
      s_ref[m * r + j] = round_to(d, acc);
      s_mag[m * r + j] = mag;
    }
  }

  std::unique_ptr<Buf> seed_holder;
  const lora_dropout_t dropout = drop.for_call(be, &seed_holder);
  std::vector<unsigned char> first_s, first_y;
  for (int run = 0; run < (be.deterministic() ? 2 : 1); ++run) {
    s_buf.poison();
    y_buf.poison();
    check.status(be.fwd(d, M, N, K, r, xs.ptr, xs.ldx, w_buf->ptr(),
                        with_bias ? bias_buf->ptr() : nullptr, a_buf->ptr(), b_buf->ptr(),
                        scaling, dropout, s_buf.ptr(), y_buf.ptr()),
                 "lora_linear_fwd");
    if (run == 0) {
      first_s = s_buf.bytes_back();
      first_y = y_buf.bytes_back();
    } else {
      check.expect(first_s == s_buf.bytes_back() && first_y == y_buf.bytes_back(),
                   "a second identical call gave different bits");
    }
  }

  const double eps = dtype_eps(d);
  // Tensor-core tiles round their operands to dtype as they stage them: dropped x is then
  // rounded (by at most eps / 2 of each term), as an eager PyTorch dropout's output is.
  const double operand_eps = drop.on() ? eps : 0.0;
  const std::vector<double> s_got = decode(first_s, d), y_got = decode(first_y, d);
  for (int64_t i = 0; i < M * r; ++i) {
    check.value("S", i, s_got[i], s_ref[i],
                eps * std::fabs(s_ref[i]) + ((K + 32) * kU32 + operand_eps) * s_mag[i]);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double base = 0, base_mag = 0, lora = 0, lora_mag = 0, s_err_mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        base += x[m * K + k] * w[n * K + k];
        base_mag += std::fabs(x[m * K + k] * w[n * K + k]);
      }
      for (int64_t j = 0; j < r; ++j) {
        lora += s_ref[m * r + j] * b[n * r + j];
        lora_mag += std::fabs(s_ref[m * r + j] * b[n * r + j]);
        s_err_mag += s_mag[m * r + j] * std::fabs(b[n * r + j]);
      }
      const double bn = with_bias ? bias[n] : 0.0;
      const double init = bn + scaling * lora;  // what the adapter kernel writes before the GEMM
      const double want = base + init;
      // Roundings: y, y_init, S (a flip of at most one step per element), dropped x as an MMA
      // operand; fp32 sums of y and of S.
      const double tol = eps * (std::fabs(want) + std::fabs(init) + scaling * lora_mag) +
                         operand_eps * scaling * s_err_mag +
                         (K + r + 32) * kU32 *
                             (base_mag + std::fabs(bn) + scaling * (lora_mag + s_err_mag));
      check.value("y", m * N + n, y_got[m * N + n], want, tol);
    }
  }
}

struct BwdMask {
  bool dx, da, db;
};

void test_bwd(Backend& be, lora_dtype_t d, const LinearShape& s, const Dropout& drop,
              XLayout layout, BwdMask mask, Rng& rng) {
  const int64_t M = s.M, N = s.N, K = s.K, r = s.r;
  char extra[64];
  std::snprintf(extra, sizeof extra, " want=%s%s%s", mask.dx ? "dx," : "", mask.da ? "dA," : "",
                mask.db ? "dB" : "");
  CaseCheck check(linear_name("lora_linear_bwd", d, s, drop, layout, extra));
  const float scaling = 0.75f;
  const std::vector<double> x = rng.values(M * K), w = rng.values(N * K), a = rng.values(r * K),
                            b = rng.values(N * r), dy = rng.values(M * N),
                            s_saved = rng.values(M * r);
  StoredX xs = store_x(be, x, M, K, layout, d);
  auto w_buf = tensor(be, w, d);
  auto a_buf = tensor(be, a, d);
  auto b_buf = tensor(be, b, d);
  auto dy_buf = tensor(be, dy, d);
  auto s_buf = tensor(be, s_saved, d);
  Buf dx_buf(be, M * K * dtype_size(d)), da_buf(be, r * K * dtype_size(d)),
      db_buf(be, N * r * dtype_size(d));

  std::unique_ptr<Buf> seed_holder;
  const lora_dropout_t dropout = drop.for_call(be, &seed_holder);
  std::vector<unsigned char> first[3];
  for (int run = 0; run < (be.deterministic() ? 2 : 1); ++run) {
    dx_buf.poison();
    da_buf.poison();
    db_buf.poison();
    check.status(be.bwd(d, M, N, K, r, dy_buf->ptr(), xs.ptr, xs.ldx, w_buf->ptr(), a_buf->ptr(),
                        b_buf->ptr(), s_buf->ptr(), scaling, dropout,
                        mask.dx ? dx_buf.ptr() : nullptr, mask.da ? da_buf.ptr() : nullptr,
                        mask.db ? db_buf.ptr() : nullptr),
                 "lora_linear_bwd");
    const std::vector<unsigned char> got[3] = {dx_buf.bytes_back(), da_buf.bytes_back(),
                                               db_buf.bytes_back()};
    for (int i = 0; i < 3; ++i) {
      if (run == 0) {
        first[i] = got[i];
      } else {
        check.expect(first[i] == got[i], "a second identical call gave different bits");
      }
    }
  }

  // dS in double, and the magnitude of each of its elements.
  std::vector<double> ds(M * r), ds_mag(M * r);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0, mag = 0;
      for (int64_t n = 0; n < N; ++n) {
        acc += dy[m * N + n] * b[n * r + j];
        mag += std::fabs(dy[m * N + n] * b[n * r + j]);
      }
      ds[m * r + j] = scaling * acc;
      ds_mag[m * r + j] = scaling * mag;
    }
  }
  const double eps = dtype_eps(d);
  const double acc_depth = static_cast<double>(M + N + K + r + 32) * kU32;
  if (mask.dx) {
    const std::vector<double> got = decode(first[0], d);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        double base = 0, base_mag = 0, lora = 0, lora_mag = 0;
        for (int64_t n = 0; n < N; ++n) {
          base += dy[m * N + n] * w[n * K + k];
          base_mag += std::fabs(dy[m * N + n] * w[n * K + k]);
        }
        const double f = drop.factor(m, k);
        for (int64_t j = 0; j < r; ++j) {
          lora += f * ds[m * r + j] * a[j * K + k];
          lora_mag += f * ds_mag[m * r + j] * std::fabs(a[j * K + k]);
        }
        const double want = base + lora;
        // dS (an fp32 sum) is rounded to dtype where tensor-core tiles take it as an operand.
        const double tol = eps * (std::fabs(want) + lora_mag) + acc_depth * (base_mag + lora_mag);
        check.value("dx", m * K + k, got[m * K + k], want, tol);
      }
    }
  }
  if (mask.da) {
    const std::vector<double> got = decode(first[1], d);
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0, mag = 0;
        for (int64_t m = 0; m < M; ++m) {
          const double xd = x[m * K + k] * drop.factor(m, k);
          acc += ds[m * r + j] * xd;
          mag += ds_mag[m * r + j] * std::fabs(xd);
        }
        // dS and dropped x rounded to dtype as tensor-core operands: eps / 2 of each term each.
        check.value("dA", j * K + k, got[j * K + k], round_to(d, acc),
                    eps * (std::fabs(acc) + mag) + acc_depth * mag);
      }
    }
  }
  if (mask.db) {
    const std::vector<double> got = decode(first[2], d);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < r; ++j) {
        double acc = 0, mag = 0;
        for (int64_t m = 0; m < M; ++m) {
          acc += dy[m * N + n] * s_saved[m * r + j];
          mag += std::fabs(dy[m * N + n] * s_saved[m * r + j]);
        }
        check.value("dB", n * r + j, got[n * r + j], round_to(d, scaling * acc),
                    eps * scaling * std::fabs(acc) + acc_depth * scaling * mag);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Multiple adapters

enum class IndexForm { kToken, kSegment };

// Adapter stacks of L adapters, each [rows, cols] with cols indexed by the rank (B) or rows by
// the rank (A); NaN past every adapter's rank. `transposed` stores each adapter's matrix
// column-major (the views the backward pass hands to the kernels).
struct Stack {
  std::vector<double> host;  // logical [L][rows][cols]
  std::unique_ptr<Buf> buf;
  AdapterStack view;
  int64_t rows, cols;
  double at(int64_t l, int64_t i, int64_t j) const { return host[(l * rows + i) * cols + j]; }
};

// rank_is_row: the rank indexes rows (A: [r_max, K]); else columns (B: [width, r_max]).
Stack make_stack(Backend& be, lora_dtype_t d, int64_t L, int64_t rows, int64_t cols,
                 bool rank_is_row, const std::vector<int32_t>& ranks, bool transposed, Rng& rng) {
  Stack s;
  s.rows = rows;
  s.cols = cols;
  s.host.assign(static_cast<size_t>(L * rows * cols), 0.0);
  std::vector<double> stored(static_cast<size_t>(L * rows * cols));
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        const bool past_rank = (rank_is_row ? i : j) >= ranks[l];
        const double v = past_rank ? kNaN : rng.value();
        s.host[(l * rows + i) * cols + j] = v;
        const int64_t at = transposed ? l * rows * cols + j * rows + i : (l * rows + i) * cols + j;
        stored[at] = v;
      }
    }
  }
  s.buf = tensor(be, stored, d);
  s.view = transposed ? AdapterStack{s.buf->ptr(), rows * cols, 1, rows}
                      : AdapterStack{s.buf->ptr(), rows * cols, cols, 1};
  return s;
}

struct MultiIndex {
  std::vector<int32_t> row_adapter;  // what each row gets: -1 or a valid adapter
  std::vector<int32_t> token_adapter, seg_indptr, seg_adapter;
  std::unique_ptr<Buf> token_buf, indptr_buf, seg_buf;
  lora_adapter_index_t view{};
};

// Adapters drawn from {-1, 0 .. L-1} plus out-of-range values, in runs; for segments also an
// empty segment.
MultiIndex make_index(Backend& be, IndexForm form, int64_t M, int32_t L, Rng& rng) {
  MultiIndex ix;
  const auto draw = [&]() -> int32_t {
    const int c = rng.below(L + 3);
    return c < L ? c : (c == L ? -1 : (c == L + 1 ? L + 2 : -7));
  };
  const auto valid = [&](int32_t a) { return (a >= 0 && a < L) ? a : -1; };
  if (form == IndexForm::kToken) {
    int32_t a = draw();
    for (int64_t m = 0; m < M; ++m) {
      if (rng.below(2) == 0) a = draw();
      ix.token_adapter.push_back(a);
      ix.row_adapter.push_back(valid(a));
    }
    ix.token_buf = raw(be, ix.token_adapter);
    ix.view.token_adapter = ix.token_buf->as<int32_t>();
    return ix;
  }
  ix.seg_indptr.push_back(0);
  int64_t row = 0;
  const int lengths[] = {5, 0, 40, 1, 17, 3, 64};
  for (int s = 0; row < M || s == 0; ++s) {
    const int64_t len = std::min<int64_t>(M - row, lengths[s % 7]);
    const int32_t a = draw();
    row += len;
    ix.seg_indptr.push_back(static_cast<int32_t>(row));
    ix.seg_adapter.push_back(a);
    for (int64_t i = 0; i < len; ++i) ix.row_adapter.push_back(valid(a));
  }
  ix.indptr_buf = raw(be, ix.seg_indptr);
  ix.seg_buf = raw(be, ix.seg_adapter);
  ix.view.seg_indptr = ix.indptr_buf->as<int32_t>();
  ix.view.seg_adapter = ix.seg_buf->as<int32_t>();
  ix.view.num_segments = static_cast<int64_t>(ix.seg_adapter.size());
  return ix;
}

// ranks {r_max, r_max/2 (at least 1), 1, 0}: heterogeneous, including an adapter of rank 0.
std::vector<int32_t> make_ranks(int64_t r_max) {
  return {static_cast<int32_t>(r_max), static_cast<int32_t>(std::max<int64_t>(1, r_max / 2)), 1,
          0};
}

// Slices of uneven widths (s + 1 parts of N each, the last one the rest) tiling [0, N), laid
// out in reverse order in y so that offsets do not follow slice order.
void make_slices(int64_t N, int64_t num_slices, std::vector<int64_t>* offset,
                 std::vector<int64_t>* width) {
  const int64_t parts = num_slices * (num_slices + 1) / 2;
  width->assign(static_cast<size_t>(num_slices), 0);
  offset->assign(static_cast<size_t>(num_slices), 0);
  int64_t used = 0;
  for (int64_t s = 0; s < num_slices; ++s) {
    (*width)[s] = s + 1 < num_slices ? N * (s + 1) / parts : N - used;
    used += (*width)[s];
  }
  int64_t at = 0;
  for (int64_t s = num_slices - 1; s >= 0; --s) {
    (*offset)[s] = at;
    at += (*width)[s];
  }
}

// `size` is the op's other dimension, named by size_name (K for shrink, N for expand).
std::string multi_name(const char* op, lora_dtype_t d, int64_t M, const char* size_name,
                       int64_t size, int64_t r_max, int64_t num_slices, IndexForm form,
                       bool transposed) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s M=%lld %s=%lld r_max=%lld slices=%lld index=%s%s", op,
                dtype_name(d), static_cast<long long>(M), size_name,
                static_cast<long long>(size), static_cast<long long>(r_max),
                static_cast<long long>(num_slices),
                form == IndexForm::kToken ? "token" : "segments",
                transposed ? " stacks=transposed" : "");
  return buf;
}

const int32_t kAdapters = 4;
const float kScalings[kAdapters] = {0.5f, 2.0f, -1.25f, 3.0f};

// t[s, m, j] of the shrink in double, and the magnitude of its terms.
void shrink_reference(const std::vector<double>& x, int64_t M, int64_t K, int64_t r_max,
                      const std::vector<Stack>& a, const std::vector<int32_t>& ranks,
                      const std::vector<int32_t>& row_adapter, std::vector<double>* t,
                      std::vector<double>* mag) {
  const int64_t S = static_cast<int64_t>(a.size());
  t->assign(static_cast<size_t>(S * M * r_max), 0.0);
  mag->assign(t->size(), 0.0);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      const int32_t ad = row_adapter[m];
      if (ad < 0) continue;
      for (int64_t j = 0; j < ranks[ad]; ++j) {
        double acc = 0, mg = 0;
        for (int64_t k = 0; k < K; ++k) {
          acc += x[m * K + k] * a[s].at(ad, j, k);
          mg += std::fabs(x[m * K + k] * a[s].at(ad, j, k));
        }
        (*t)[(s * M + m) * r_max + j] = kScalings[ad] * acc;
        (*mag)[(s * M + m) * r_max + j] = std::fabs(kScalings[ad]) * mg;
      }
    }
  }
}

void test_shrink(Backend& be, lora_dtype_t d, int64_t M, int64_t K, int64_t r_max,
                 int64_t num_slices, IndexForm form, bool transposed, Rng& rng) {
  CaseCheck check(
      multi_name("multi_lora_shrink", d, M, "K", K, r_max, num_slices, form, transposed));
  const std::vector<int32_t> ranks = make_ranks(r_max);
  MultiIndex ix = make_index(be, form, M, kAdapters, rng);
  const std::vector<double> x = rng.values(M * K);
  StoredX xs = store_x(be, x, M, K, transposed ? XLayout::kMisaligned : XLayout::kDense, d);
  std::vector<Stack> a;
  std::vector<AdapterStack> views;
  for (int64_t s = 0; s < num_slices; ++s) {
    a.push_back(make_stack(be, d, kAdapters, r_max, K, true, ranks, transposed, rng));
    views.push_back(a.back().view);
  }
  auto ranks_buf = raw(be, ranks);
  auto scal_buf = raw(be, std::vector<float>(kScalings, kScalings + kAdapters));
  Buf t_buf(be, num_slices * M * r_max * 4);

  std::vector<unsigned char> first;
  for (int run = 0; run < (be.deterministic() ? 2 : 1); ++run) {
    t_buf.poison();
    check.status(be.shrink(d, M, K, kAdapters, r_max, num_slices, xs.ptr, xs.ldx, views.data(),
                           scal_buf->as<float>(), ranks_buf->as<int32_t>(), ix.view,
                           t_buf.as<float>()),
                 "multi_lora_shrink");
    if (run == 0) {
      first = t_buf.bytes_back();
    } else {
      check.expect(first == t_buf.bytes_back(), "a second identical call gave different bits");
    }
  }
  std::vector<double> want, mag;
  shrink_reference(x, M, K, r_max, a, ranks, ix.row_adapter, &want, &mag);
  const std::vector<double> got = decode(first, LORA_DTYPE_F32);
  for (size_t i = 0; i < want.size(); ++i) {
    check.value("t", i, got[i], want[i], kU32 * std::fabs(want[i]) + (K + 32) * kU32 * mag[i]);
  }
}

void test_expand(Backend& be, lora_dtype_t d, int64_t M, int64_t N, int64_t r_max,
                 int64_t num_slices, IndexForm form, bool transposed, Rng& rng) {
  CaseCheck check(
      multi_name("multi_lora_expand", d, M, "N", N, r_max, num_slices, form, transposed));
  const std::vector<int32_t> ranks = make_ranks(r_max);
  MultiIndex ix = make_index(be, form, M, kAdapters, rng);
  std::vector<int64_t> offset, width;
  make_slices(N, num_slices, &offset, &width);
  std::vector<Stack> b;
  std::vector<AdapterStack> views;
  for (int64_t s = 0; s < num_slices; ++s) {
    b.push_back(make_stack(be, d, kAdapters, width[s], r_max, false, ranks, transposed, rng));
    views.push_back(b.back().view);
  }
  // t: values up to each row's rank, NaN past it (never to be read).
  std::vector<double> t(static_cast<size_t>(num_slices * M * r_max), kNaN);
  for (int64_t s = 0; s < num_slices; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      const int32_t a = ix.row_adapter[m];
      for (int64_t j = 0; a >= 0 && j < ranks[a]; ++j) t[(s * M + m) * r_max + j] = rng.value();
    }
  }
  std::vector<float> t_f32(t.begin(), t.end());
  auto t_buf = raw(be, t_f32);
  auto ranks_buf = raw(be, ranks);
  const std::vector<double> y0 = rng.values(M * N);
  auto y_buf = tensor(be, y0, d);

  check.status(be.expand(d, M, kAdapters, r_max, num_slices, t_buf->as<float>(), views.data(),
                         offset.data(), width.data(), ranks_buf->as<int32_t>(), ix.view,
                         y_buf->ptr(), N),
               "multi_lora_expand");
  const std::vector<double> got = read_tensor(*y_buf, d);
  const double eps = dtype_eps(d);
  for (int64_t s = 0; s < num_slices; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      const int32_t a = ix.row_adapter[m];
      for (int64_t n = 0; n < width[s]; ++n) {
        const int64_t i = m * N + offset[s] + n;
        if (a < 0 || ranks[a] == 0) {  // untouched, bit for bit
          check.value("y (no adapter)", i, got[i], y0[i], 0.0);
          continue;
        }
        double acc = 0, mag = 0;
        for (int64_t j = 0; j < ranks[a]; ++j) {
          acc += t[(s * M + m) * r_max + j] * b[s].at(a, n, j);
          mag += std::fabs(t[(s * M + m) * r_max + j] * b[s].at(a, n, j));
        }
        const double want = y0[i] + acc;
        check.value("y", i, got[i], want,
                    eps * std::fabs(want) + (r_max + 32) * kU32 * (std::fabs(y0[i]) + mag));
      }
    }
  }
}

void test_linear(Backend& be, lora_dtype_t d, int64_t M, int64_t N, int64_t K, int64_t r_max,
                 int64_t num_slices, IndexForm form, bool with_bias, Rng& rng) {
  char extra[32];
  std::snprintf(extra, sizeof extra, " N=%lld%s", static_cast<long long>(N),
                with_bias ? "" : " no-bias");
  CaseCheck check(
      multi_name("multi_lora_linear_fwd", d, M, "K", K, r_max, num_slices, form, false) + extra);
  const std::vector<int32_t> ranks = make_ranks(r_max);
  MultiIndex ix = make_index(be, form, M, kAdapters, rng);
  std::vector<int64_t> offset, width;
  make_slices(N, num_slices, &offset, &width);
  const std::vector<double> x = rng.values(M * K), w = rng.values(N * K), bias = rng.values(N);
  StoredX xs = store_x(be, x, M, K, XLayout::kPadded, d);
  auto w_buf = tensor(be, w, d);
  auto bias_buf = tensor(be, bias, d);
  std::vector<Stack> a, b;
  std::vector<AdapterStack> a_views, b_views;
  for (int64_t s = 0; s < num_slices; ++s) {
    a.push_back(make_stack(be, d, kAdapters, r_max, K, true, ranks, false, rng));
    b.push_back(make_stack(be, d, kAdapters, width[s], r_max, false, ranks, false, rng));
    a_views.push_back(a.back().view);
    b_views.push_back(b.back().view);
  }
  auto ranks_buf = raw(be, ranks);
  auto scal_buf = raw(be, std::vector<float>(kScalings, kScalings + kAdapters));
  Buf t_buf(be, num_slices * M * r_max * 4), y_buf(be, M * N * dtype_size(d));

  std::vector<unsigned char> first_t, first_y;
  for (int run = 0; run < (be.deterministic() ? 2 : 1); ++run) {
    t_buf.poison();
    y_buf.poison();
    check.status(be.linear(d, M, N, K, kAdapters, r_max, num_slices, xs.ptr, xs.ldx,
                           w_buf->ptr(), with_bias ? bias_buf->ptr() : nullptr, a_views.data(),
                           b_views.data(), offset.data(), width.data(), scal_buf->as<float>(),
                           ranks_buf->as<int32_t>(), ix.view, t_buf.as<float>(), y_buf.ptr()),
                 "multi_lora_linear_fwd");
    if (run == 0) {
      first_t = t_buf.bytes_back();
      first_y = y_buf.bytes_back();
    } else {
      check.expect(first_t == t_buf.bytes_back() && first_y == y_buf.bytes_back(),
                   "a second identical call gave different bits");
    }
  }
  std::vector<double> t, t_mag;
  shrink_reference(x, M, K, r_max, a, ranks, ix.row_adapter, &t, &t_mag);
  const std::vector<double> t_got = decode(first_t, LORA_DTYPE_F32);
  for (size_t i = 0; i < t.size(); ++i) {
    check.value("t", i, t_got[i], t[i], kU32 * std::fabs(t[i]) + (K + 32) * kU32 * t_mag[i]);
  }
  const std::vector<double> y_got = decode(first_y, d);
  const double eps = dtype_eps(d);
  for (int64_t s = 0; s < num_slices; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      const int32_t ad = ix.row_adapter[m];
      const int64_t rank = ad >= 0 ? ranks[ad] : 0;
      for (int64_t n = 0; n < width[s]; ++n) {
        const int64_t col = offset[s] + n;
        double base = 0, base_mag = 0, lora = 0, lora_mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          base += x[m * K + k] * w[col * K + k];
          base_mag += std::fabs(x[m * K + k] * w[col * K + k]);
        }
        for (int64_t j = 0; j < rank; ++j) {
          const int64_t ti = (s * M + m) * r_max + j;
          lora += t[ti] * b[s].at(ad, n, j);
          lora_mag += (std::fabs(t[ti]) + t_mag[ti]) * std::fabs(b[s].at(ad, n, j));
        }
        const double bn = with_bias ? bias[col] : 0.0;
        const double want = base + bn + lora;
        const double tol = eps * (std::fabs(want) + std::fabs(bn + lora)) +
                           (K + r_max + 32) * kU32 * (base_mag + std::fabs(bn) + lora_mag);
        check.value("y", m * N + col, y_got[m * N + col], want, tol);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------

void run_suite(Backend& be, bool quick) {
  Rng rng(20261123);
  const lora_dtype_t dtypes[] = {LORA_DTYPE_F32, LORA_DTYPE_F16, LORA_DTYPE_BF16};
  const int64_t ms[] = {0, 1, 7, 8, 9, 133};
  const int64_t nk[][2] = {{33, 100}, {256, 256}, {100, 33}};
  const int64_t ranks[] = {1, 8, 64};
  const XLayout layouts[] = {XLayout::kDense, XLayout::kPadded, XLayout::kMisaligned};
  const Dropout drops[] = {make_dropout(0.0, 0), make_dropout(0.25, 0x5eed1234u)};

  int variant = 0;
  for (lora_dtype_t d : dtypes) {
    for (int64_t M : ms) {
      for (const auto& shape : nk) {
        for (int64_t r : ranks) {
          for (const Dropout& listed : drops) {
            // A third of the dropout cases pass their seed in memory.
            const Dropout drop = listed.on() && variant % 3 == 1 ? with_seed_in_memory(listed) : listed;
            const LinearShape s{M, shape[0], shape[1], r};
            const XLayout layout = layouts[variant % 3];
            const BwdMask masks[] = {{true, true, true}, {true, false, false},
                                     {false, true, true}, {false, false, true}};
            test_fwd(be, d, s, drop, layout, variant % 4 != 3, rng);
            test_bwd(be, d, s, drop, layout, masks[variant % 4], rng);
            ++variant;
          }
        }
      }
    }
    // Ranks past the fused forward's limit, the largest rank, and a rank of 0.
    for (int64_t r : {100, 512}) {
      const LinearShape s{133, 40, 72, r};
      test_fwd(be, d, s, drops[1], XLayout::kPadded, true, rng);
      test_bwd(be, d, s, drops[1], XLayout::kPadded, BwdMask{true, true, true}, rng);
    }
    test_fwd(be, d, LinearShape{7, 33, 100, 0}, drops[0], XLayout::kDense, true, rng);
    test_bwd(be, d, LinearShape{7, 33, 100, 0}, drops[0], XLayout::kDense,
             BwdMask{true, true, true}, rng);
    // Decode at a layer's real width: many column groups per block of the decode plans, and
    // a depth split into long chunks between the blocks of a cluster.
    test_fwd(be, d, LinearShape{5, 1000, 4096, 16}, drops[1], XLayout::kDense, true, rng);
    test_fwd(be, d, LinearShape{16, 520, 2048, 64}, drops[1], XLayout::kPadded, true, rng);
    test_fwd(be, d, LinearShape{12, 72, 300, 512}, drops[0], XLayout::kMisaligned, false, rng);
    // Wider than the decode cluster kernel's grid (at most the clusters resident at once): its
    // blocks take several column groups each, with S gathered once; 1-, 4- and 16-row instances.
    for (int64_t M : {1, 3, 12}) {
      test_fwd(be, d, LinearShape{M, 8200, 264, 16}, drops[1], XLayout::kDense, true, rng);
    }
    // Large M: the single-launch adapter kernel of the forward (thin and wide rank tiles), and
    // the backward's split reductions over many rows.
    if (!quick) {
      for (int64_t r : {8, 16, 64}) {
        const LinearShape s{8200, 40, 72, r};
        test_fwd(be, d, s, drops[r == 16 ? 1 : 0], XLayout::kDense, true, rng);
        test_bwd(be, d, s, drops[r == 16 ? 1 : 0], XLayout::kDense, BwdMask{true, true, true},
                 rng);
      }
    }
  }

  const int64_t multi_ms[] = {0, 1, 7, 133};
  const int64_t multi_ranks[] = {1, 8, 64};
  for (lora_dtype_t d : dtypes) {
    for (int64_t M : multi_ms) {
      for (const auto& shape : nk) {
        for (int64_t r_max : multi_ranks) {
          for (IndexForm form : {IndexForm::kToken, IndexForm::kSegment}) {
            const int64_t slices = variant % 2 ? 3 : 1;
            const bool transposed = variant % 3 == 1;
            test_shrink(be, d, M, shape[1], r_max, slices, form, transposed, rng);
            test_expand(be, d, M, shape[0], r_max, slices, form, transposed, rng);
            test_linear(be, d, M, shape[0], shape[1], r_max, slices, form, variant % 4 != 3, rng);
            ++variant;
          }
        }
      }
    }
    test_shrink(be, d, 20, 64, 512, 2, IndexForm::kSegment, false, rng);
    test_expand(be, d, 20, 64, 512, 2, IndexForm::kToken, true, rng);
    test_linear(be, d, 20, 48, 64, 512, 2, IndexForm::kToken, true, rng);
  }
}

// One of the library's LORA_OPS_CUDA_* switches set for a scope, and put back as it was after (not
// unset: a switch the caller's environment turned off stays off for the sections after).
class ScopedSwitch {
 public:
  ScopedSwitch(const char* name, const char* value) : name_(name) {
    const char* before = std::getenv(name);
    had_ = before != nullptr;
    if (had_) before_ = before;
    setenv(name, value, 1);
  }
  ~ScopedSwitch() {
    if (had_) {
      setenv(name_, before_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedSwitch(const ScopedSwitch&) = delete;
  ScopedSwitch& operator=(const ScopedSwitch&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string before_;
};

// Whether the caller's environment switched a fast path off (scripts/gpu_check.sh does, for a
// family scripts/gpu_probe.py found hanging or wrong): the sections that require it are skipped.
bool switched_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// One case per kernel family, for compute-sanitizer's racecheck and synccheck (tens of times
// slower than a plain run): the decode cluster kernel (1 and 16 rows), the cluster adapter
// kernel (M > 16, a rank whose shared memory needs the opt-in), the backward's split kernels,
// the multi-adapter shrink / expand / fused layer, and on Hopper one adapter-in-GEMM case each
// way. Run with the cluster plans required (the caller sets LORA_OPS_CUDA_CLUSTERS=1).
void run_smoke(Backend& be, bool hopper_gemm) {
  Rng rng(11);
  const Dropout drop = make_dropout(0.25, 0x5a5a), none = make_dropout(0.0, 0);
  const lora_dtype_t bf16 = LORA_DTYPE_BF16;
  test_fwd(be, bf16, LinearShape{1, 1000, 520, 16}, drop, XLayout::kDense, true, rng);
  test_fwd(be, bf16, LinearShape{16, 520, 264, 64}, drop, XLayout::kPadded, true, rng);
  test_fwd(be, bf16, LinearShape{133, 520, 264, 64}, drop, XLayout::kPadded, true, rng);
  test_fwd(be, LORA_DTYPE_F32, LinearShape{133, 100, 72, 8}, none, XLayout::kDense, true, rng);
  test_bwd(be, bf16, LinearShape{133, 264, 520, 64}, drop, XLayout::kPadded,
           BwdMask{true, true, true}, rng);
  test_fwd(be, bf16, LinearShape{1, 1000, 520, 16}, with_seed_in_memory(drop), XLayout::kDense, true,
           rng);
  test_bwd(be, bf16, LinearShape{133, 264, 520, 64}, with_seed_in_memory(drop), XLayout::kDense,
           BwdMask{true, true, true}, rng);
  test_bwd(be, LORA_DTYPE_F32, LinearShape{9, 100, 72, 8}, none, XLayout::kDense,
           BwdMask{true, true, true}, rng);
  for (int64_t M : {7, 133}) {
    test_shrink(be, bf16, M, 256, 8, 2, IndexForm::kSegment, false, rng);
    test_expand(be, bf16, M, 256, 8, 2, IndexForm::kToken, true, rng);
    test_linear(be, bf16, M, 100, 256, 16, 3, IndexForm::kToken, true, rng);
  }
  if (hopper_gemm) {
    ScopedSwitch required("LORA_OPS_CUDA_ADAPTER_GEMM", "1");
    test_fwd(be, bf16, LinearShape{1030, 4104, 72, 24}, drop, XLayout::kDense, true, rng);
    test_bwd(be, bf16, LinearShape{520, 72, 8200, 24}, none, XLayout::kDense,
             BwdMask{true, true, true}, rng);
  }
}

// One case of each op recorded into a CUDA graph and replayed: the entry points must neither
// synchronise nor allocate. The single-adapter ops also with their seed in device memory, read
// by the replayed kernels.
void run_graph_cases(CudaBackend& be) {
  Rng rng(7);
  be.set_capture(true);
  const Dropout drop = make_dropout(0.25, 99);
  for (int64_t M : {3, 133}) {  // decode and GEMM plans
    test_fwd(be, LORA_DTYPE_BF16, LinearShape{M, 256, 256, 16}, drop, XLayout::kDense, true, rng);
    test_fwd(be, LORA_DTYPE_BF16, LinearShape{M, 256, 256, 16}, with_seed_in_memory(drop),
             XLayout::kDense, true, rng);
    test_linear(be, LORA_DTYPE_BF16, M, 100, 256, 8, 3, IndexForm::kToken, true, rng);
  }
  test_bwd(be, LORA_DTYPE_BF16, LinearShape{133, 256, 256, 16}, drop, XLayout::kDense,
           BwdMask{true, true, true}, rng);
  test_bwd(be, LORA_DTYPE_BF16, LinearShape{133, 256, 256, 16}, with_seed_in_memory(drop),
           XLayout::kDense, BwdMask{true, true, true}, rng);
  test_shrink(be, LORA_DTYPE_F16, 7, 256, 8, 2, IndexForm::kSegment, false, rng);
  test_expand(be, LORA_DTYPE_F16, 7, 256, 8, 2, IndexForm::kSegment, false, rng);
  be.set_capture(false);
}

// The single-adapter forward without a cuBLAS handle: the plans that end in no cuBLAS GEMM run
// (M <= 8 anywhere, the decode cluster kernel to 16 rows where clusters run), and a call whose
// plan needs one is refused before it writes anything.
void run_without_cublas_cases(CudaBackend& be, bool clusters) {
  Rng rng(23);
  const Dropout none = make_dropout(0.0, 0);
  be.set_without_cublas(true);
  test_fwd(be, LORA_DTYPE_BF16, LinearShape{8, 264, 520, 16}, none, XLayout::kDense, true, rng);
  if (clusters) {
    test_fwd(be, LORA_DTYPE_BF16, LinearShape{16, 264, 520, 16}, none, XLayout::kDense, true,
             rng);
  }
  const int64_t M = clusters ? 17 : 9, N = 72, K = 40, r = 8;
  const lora_dtype_t d = LORA_DTYPE_BF16;
  CaseCheck check("lora_linear_fwd without a cuBLAS handle, M=" + std::to_string(M) +
                  ": refused, nothing written");
  Buf x(be, M * K * 2), w(be, N * K * 2), a(be, r * K * 2), b(be, N * r * 2),
      s_out(be, M * r * 2), y(be, M * N * 2);
  for (Buf* buf : {&x, &w, &a, &b, &s_out, &y}) buf->poison();
  const std::vector<unsigned char> s_before = s_out.bytes_back(), y_before = y.bytes_back();
  check.expect(be.fwd(d, M, N, K, r, x.ptr(), K, w.ptr(), nullptr, a.ptr(), b.ptr(), 0.5f,
                      none.for_call(be, nullptr), s_out.ptr(),
                      y.ptr()) == LORA_ERR_INVALID_ARGUMENT,
               "status LORA_ERR_INVALID_ARGUMENT");
  check.expect(s_out.bytes_back() == s_before && y.bytes_back() == y_before, "S or y written");
  be.set_without_cublas(false);
}

// Hopper's adapter-in-GEMM plans (csrc/cuda/adapter_gemm*): shapes they take (K, N, r multiples
// of 8, >= 128 output tiles of 128 x 256), with ragged last tiles in M, N, K and r, two k-tiles
// of adapter depth, with and without dropout and bias, and once each from a CUDA graph. The
// caller has set LORA_OPS_CUDA_ADAPTER_GEMM=1, so a call a plan should take but does not fails.
void run_adapter_gemm_cases(CudaBackend& be) {
  Rng rng(90);
  const Dropout none = make_dropout(0.0, 0), drop = make_dropout(0.25, 0x90a);
  for (lora_dtype_t d : {LORA_DTYPE_F16, LORA_DTYPE_BF16}) {
    test_fwd(be, d, LinearShape{1030, 4104, 72, 24}, drop, XLayout::kDense, true, rng);
    test_fwd(be, d, LinearShape{1030, 4104, 72, 24}, none, XLayout::kDense, false, rng);
    test_fwd(be, d, LinearShape{2048, 2048, 512, 64}, none, XLayout::kPadded, true, rng);
    test_fwd(be, d, LinearShape{1100, 4096, 136, 128}, drop, XLayout::kDense, true, rng);
    // Backward without dropout: dX = dY W + dS A in one GEMM, K wide and N + r deep. With
    // dropout the plan does not apply (the requirement covers only the calls it may take).
    test_bwd(be, d, LinearShape{520, 72, 8200, 24}, none, XLayout::kDense,
             BwdMask{true, true, true}, rng);
    test_bwd(be, d, LinearShape{520, 136, 8200, 128}, none, XLayout::kPadded,
             BwdMask{true, false, false}, rng);
    test_bwd(be, d, LinearShape{520, 72, 8200, 24}, drop, XLayout::kDense,
             BwdMask{true, true, true}, rng);
  }
  be.set_capture(true);
  test_fwd(be, LORA_DTYPE_BF16, LinearShape{1030, 4104, 72, 24}, drop, XLayout::kDense, true, rng);
  test_bwd(be, LORA_DTYPE_BF16, LinearShape{520, 72, 8200, 24}, none, XLayout::kDense,
           BwdMask{true, true, true}, rng);
  be.set_capture(false);
}

// Host only (runs without a GPU too): CUTLASS's can_implement takes every shape of
// run_adapter_gemm_cases and of the T1 suite that the plans admit, and the plans refuse shapes
// whose rows TMA cannot address.
void check_adapter_gemm_accepts() {
  if (!lora_ops::cuda::adapter_gemm_built()) return;
  CaseCheck check("adapter_gemm_accepts: the plans' shapes against CUTLASS's can_implement");
  struct Product {
    int64_t M, N, K, r;
    bool depth_by_out;
  };
  const Product taken[] = {
      {1030, 4104, 72, 24, false},   {2048, 2048, 512, 64, false}, {1100, 4096, 136, 128, false},
      {4096, 4096, 4096, 16, false}, {1024, 4096, 4096, 8, false}, {16384, 14336, 4096, 64, false},
      {520, 8200, 72, 24, true},     {520, 8200, 136, 128, true},  {4096, 4096, 4096, 16, true},
      {4096, 4096, 14336, 16, true}, {4096, 4096, 4096, 256, true}};
  // Ragged rank, N or K; too few tiles or rows; a forward rank past the cluster kernel's that
  // computes its s·S (kClusterMaxRank); a depth past int32.
  const Product refused[] = {{1030, 4104, 72, 20, false},  {1030, 4100, 72, 24, false},
                             {1030, 4104, 70, 24, false},  {64, 4096, 4096, 16, false},
                             {16, 131072, 4096, 16, false}, {4096, 4096, 4096, 256, false},
                             {520, 8200, 76, 24, true},    {4096, 4096, 2147483520, 16, true}};
  for (lora_dtype_t d : {LORA_DTYPE_F16, LORA_DTYPE_BF16}) {
    for (const Product& p : taken) {
      check.expect(lora_ops::cuda::adapter_gemm_accepts(d, p.M, p.N, p.K, p.r, p.depth_by_out),
                   "refused M=" + std::to_string(p.M) + " N=" + std::to_string(p.N) +
                       " K=" + std::to_string(p.K) + " r=" + std::to_string(p.r));
    }
    for (const Product& p : refused) {
      check.expect(!lora_ops::cuda::adapter_gemm_accepts(d, p.M, p.N, p.K, p.r, p.depth_by_out),
                   "accepted M=" + std::to_string(p.M) + " N=" + std::to_string(p.N) +
                       " K=" + std::to_string(p.K) + " r=" + std::to_string(p.r));
    }
  }
  check.expect(!lora_ops::cuda::adapter_gemm_accepts(LORA_DTYPE_F32, 4096, 4096, 4096, 16, false),
               "accepted fp32");
}

}  // namespace

int main(int argc, char** argv) {
  // --quick: the suite without its large-M cases; --smoke: one case per kernel family only
  // (run_smoke), for the slow sanitizer tools.
  // A line per case as it ends, also into a pipe: a run stopped by a time limit (a hung kernel)
  // still shows the cases it finished and so the one it was in.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool smoke = argc > 1 && std::strcmp(argv[1], "--smoke") == 0;
#ifdef LORA_TEST_CPU_BACKEND
  {
    std::printf("== backend cpu (checks this harness)\n");
    CpuBackend cpu;
    if (smoke) {
      run_smoke(cpu, false);
    } else {
      run_suite(cpu, quick);
    }
  }
#endif
  check_adapter_gemm_accepts();
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("test_cuda_kernels: no CUDA device (%s); CUDA cases skipped\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    std::printf("test_cuda_kernels: %d cases, %d failed\n", g_cases, g_failed_cases);
    return g_failed_cases > 0 ? 1 : 77;
  }
  cudaDeviceProp prop;
  cuda_ok(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("== backend cuda on %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  const bool clusters = prop.major >= 9 && !switched_off("LORA_OPS_CUDA_CLUSTERS");
  const bool hopper_gemm = prop.major == 9 && lora_ops::cuda::adapter_gemm_built() &&
                           !switched_off("LORA_OPS_CUDA_ADAPTER_GEMM");
  for (const char* name :
       {"LORA_OPS_CUDA_CLUSTERS", "LORA_OPS_CUDA_MMA", "LORA_OPS_CUDA_ADAPTER_GEMM"}) {
    if (switched_off(name)) std::printf("   %s=0 in the environment: not required\n", name);
  }
  if (smoke) {
    CudaBackend cuda;
    std::unique_ptr<ScopedSwitch> required;
    if (clusters) required = std::make_unique<ScopedSwitch>("LORA_OPS_CUDA_CLUSTERS", "1");
    run_smoke(cuda, hopper_gemm);
    std::printf("test_cuda_kernels --smoke: %d cases, %d failed\n", g_cases, g_failed_cases);
    return g_failed_cases > 0 ? 1 : 0;
  }
  {
    CudaBackend cuda;
    {
      // Where clusters exist, a cluster plan the planner picks must launch: its shared memory or
      // occupancy refused would otherwise fall back silently and pass as the other plans.
      std::unique_ptr<ScopedSwitch> required;
      if (clusters) {
        std::printf("== backend cuda, cluster plans required (LORA_OPS_CUDA_CLUSTERS=1)\n");
        required = std::make_unique<ScopedSwitch>("LORA_OPS_CUDA_CLUSTERS", "1");
      }
      run_suite(cuda, quick);
      run_graph_cases(cuda);
      run_without_cublas_cases(cuda, clusters);
    }
    if (hopper_gemm) {
      std::printf("== backend cuda, adapter-in-GEMM plan required (LORA_OPS_CUDA_ADAPTER_GEMM=1)\n");
      ScopedSwitch required("LORA_OPS_CUDA_ADAPTER_GEMM", "1");
      run_adapter_gemm_cases(cuda);
    }
    // On GPUs with thread block clusters the forward takes its single-launch plans above; the
    // multi-launch plans that other GPUs run are checked here on the same device.
    if (prop.major >= 9) {
      std::printf("== backend cuda, cluster plans switched off (LORA_OPS_CUDA_CLUSTERS=0)\n");
      ScopedSwitch off("LORA_OPS_CUDA_CLUSTERS", "0");
      run_suite(cuda, /*quick=*/true);
      run_graph_cases(cuda);
    }
    // fp16 / bf16 products run on tensor-core tiles on sm_80+; the SIMT tiles that fp32 (and
    // older GPUs) run are checked for them here.
    if (prop.major >= 8) {
      std::printf("== backend cuda, tensor-core tiles switched off (LORA_OPS_CUDA_MMA=0)\n");
      ScopedSwitch off("LORA_OPS_CUDA_MMA", "0");
      run_suite(cuda, /*quick=*/true);
    }
  }
  std::printf("test_cuda_kernels: %d cases, %d failed\n", g_cases, g_failed_cases);
  return g_failed_cases > 0 ? 1 : 0;
}
