// Standalone GPU test and benchmark of the flag-publishing GEMM (CUDA + cuBLAS, no torch).
//
// Build from the repository root (sm_90a; CUTLASS headers from the nvidia-cutlass wheel):
//   CUTLASS=.venv/lib/python3.11/site-packages/cutlass_library/source
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -Icsrc -Icsrc/include -I$CUTLASS/include -I$CUTLASS/tools/util/include \
//     csrc/kernels/gemm/tests/tile_gemm_test.cu csrc/kernels/gemm/tile_gemm.cu \
//     -lcublas -o tile_gemm_test
// Run: ./tile_gemm_test [--no-bench]
//
// Correctness: bf16 and fp16, both B layouts, M in {1, 3, 8, 128, 1000, 4097},
// (N, K) in {(8192, 2048), (8192, 1024), (264, 136)}, plus other SM budgets,
// padded leading dimensions and argument errors. Each case runs the GEMM 3
// times into a NaN-poisoned D and checks D against cuBLAS in fp32, that nothing
// outside D[:M, :N] was written, and that every tile flag equals the call count.
// The workspace is zeroed once and shared by all cases, which checks that each
// launch leaves it reusable. Then a timing table against cublasGemmEx.
// Prints "ALL PASS" and exits 0, or lists the failures and exits 1; a CUDA
// error or a GPU hang (30 s bound per wait) exits 2.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "../tile_gemm.h"

using distfuse::DType;
using distfuse::TileGemmParams;

namespace {

[[noreturn]] void fatal(const char* what, const char* detail, const char* file, int line) {
  std::fprintf(stderr, "FATAL %s: %s (%s:%d)\n", what, detail, file, line);
  std::exit(2);
}

#define CUDA_CHECK(call)                                                                  \
  do {                                                                                    \
    cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) fatal(#call, cudaGetErrorString(err_), __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(call)                                                          \
  do {                                                                              \
    cublasStatus_t st_ = (call);                                                    \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                               \
      fatal(#call, cublasGetStatusString(st_), __FILE__, __LINE__);                 \
  } while (0)

constexpr double kWaitBoundSeconds = 30.0;

// Waits for the stream with a bound, so that a hung kernel ends the test.
void sync_bounded(cudaStream_t stream, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t err = cudaStreamQuery(stream);
    if (err == cudaSuccess) return;
    if (err != cudaErrorNotReady) fatal(what, cudaGetErrorString(err), __FILE__, __LINE__);
    const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start;
    if (waited.count() > kWaitBoundSeconds) fatal(what, "GPU did not finish in 30 s", __FILE__, __LINE__);
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { CUDA_CHECK(cudaMalloc(&ptr, bytes < 16 ? 16 : bytes)); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr); }
};

template <class T> __device__ T from_float(float x);
template <> __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <> __device__ __half from_float(float x) { return __float2half(x); }
__device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ float to_float(__half x) { return __half2float(x); }

// Uniform in [-1, 1) from a hash of (seed, index).
template <class T>
__global__ void fill_uniform(T* p, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = (uint64_t(seed) << 40) ^ uint64_t(i);
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull; h ^= h >> 33;
    p[i] = from_float<T>(float(h >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
}

constexpr uint16_t kPoison = 0xFFFF;  // NaN in both bf16 and fp16

struct CheckResult {
  unsigned long long bad;
  unsigned long long first_bad;
  unsigned int max_err_ratio_bits;  // max |d - ref| / limit over D[:M, :N], as float bits
};

// D[:M, :N] must match the fp32 reference within tol * |ref| + abs_tol; every
// other element of the allocation (row padding, guard rows) must be untouched.
template <class T>
__global__ void check_output(const T* d, int64_t ldd, int m, int n, int64_t rows_allocated,
                             const float* ref, float tol, float abs_tol, CheckResult* out) {
  float max_ratio = 0.f;
  const int64_t count = rows_allocated * ldd;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / ldd, col = i % ldd;
    bool ok;
    if (row < m && col < n) {
      const float x = ref[row * n + col];
      const float err = fabsf(to_float(d[i]) - x);
      const float limit = tol * fabsf(x) + abs_tol;
      ok = err <= limit;  // false for NaN
      if (ok) max_ratio = fmaxf(max_ratio, err / limit);
    } else {
      ok = reinterpret_cast<const uint16_t*>(d)[i] == kPoison;
    }
    if (!ok) {
      atomicAdd(&out->bad, 1ull);
      atomicMin(&out->first_bad, static_cast<unsigned long long>(i));
    }
  }
  for (int offset = 16; offset > 0; offset /= 2)
    max_ratio = fmaxf(max_ratio, __shfl_xor_sync(0xffffffffu, max_ratio, offset));
  if (threadIdx.x % 32 == 0) atomicMax(&out->max_err_ratio_bits, __float_as_uint(max_ratio));
}

struct Device {
  cudaStream_t stream;
  cublasHandle_t cublas;
  int sm_count;
  std::string name;
};

struct Case {
  DType dtype;
  bool b_transposed;
  int m, n, k;
  int sm_count;
  int pad;  // extra elements per row of A, B and D
};

std::string describe(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%s %s M=%d N=%d K=%d sm_count=%d pad=%d",
                c.dtype == DType::kBFloat16 ? "bf16" : "fp16", c.b_transposed ? "B^T" : "B",
                c.m, c.n, c.k, c.sm_count, c.pad);
  return buf;
}

cudaDataType_t cuda_type(DType t) { return t == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F; }

// Row-major D[M, N] = A[M, K] @ B seen by column-major cuBLAS as D^T = B^T A^T.
void cublas_gemm(const Device& dev, const TileGemmParams& p, void* d, cudaDataType_t d_type,
                 int64_t ldd) {
  const float alpha = 1.f, beta = 0.f;
  CUBLAS_CHECK(cublasGemmEx(dev.cublas, p.b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                            p.n, p.m, p.k, &alpha, p.b, cuda_type(p.dtype), int(p.ldb), p.a,
                            cuda_type(p.dtype), int(p.lda), &beta, d, d_type, int(ldd),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

int tiles_of(const TileGemmParams& p) {
  const int tm = distfuse::tile_gemm_tile_m(p), tn = distfuse::tile_gemm_tile_n(p);
  return ((p.m + tm - 1) / tm) * ((p.n + tn - 1) / tn);
}

constexpr int kGuardRows = 64;
constexpr int kGuardFlags = 64;
constexpr int kCalls = 3;

template <class T>
bool run_case(const Device& dev, const Case& c, void* workspace, size_t workspace_capacity,
              std::vector<std::string>& failures) {
  const int64_t lda = c.k + c.pad, ldd = c.n + c.pad;
  const int64_t ldb = (c.b_transposed ? c.k : c.n) + c.pad;
  const int64_t b_rows = c.b_transposed ? c.n : c.k;
  DeviceBuffer a(size_t(c.m) * lda * sizeof(T)), b(size_t(b_rows) * ldb * sizeof(T));
  const int64_t d_rows = int64_t(c.m) + kGuardRows;
  DeviceBuffer d(size_t(d_rows) * ldd * sizeof(T)), ref(size_t(c.m) * c.n * sizeof(float));
  DeviceBuffer check(sizeof(CheckResult));

  const uint32_t seed = uint32_t(c.m * 7919 + c.n * 131 + c.k);
  fill_uniform<<<1024, 256, 0, dev.stream>>>(a.as<T>(), int64_t(c.m) * lda, seed);
  fill_uniform<<<1024, 256, 0, dev.stream>>>(b.as<T>(), b_rows * ldb, seed + 1);
  CUDA_CHECK(cudaGetLastError());

  TileGemmParams p{};
  p.a = a.ptr; p.b = b.ptr; p.d = d.ptr;
  p.lda = lda; p.ldb = ldb; p.ldd = ldd;
  p.m = c.m; p.n = c.n; p.k = c.k;
  p.b_transposed = c.b_transposed;
  p.dtype = c.dtype;
  p.sm_count = c.sm_count;

  const int tiles = tiles_of(p);
  DeviceBuffer flags(size_t(tiles + kGuardFlags) * sizeof(uint32_t));
  CUDA_CHECK(cudaMemsetAsync(flags.ptr, 0, size_t(tiles + kGuardFlags) * sizeof(uint32_t), dev.stream));
  p.tile_flags = flags.as<uint32_t>();

  const size_t ws_bytes = distfuse::tile_gemm_workspace_bytes(p);
  if (ws_bytes > workspace_capacity) {
    failures.push_back(describe(c) + ": workspace of " + std::to_string(ws_bytes) +
                       " bytes exceeds the test's " + std::to_string(workspace_capacity));
    return false;
  }

  cublas_gemm(dev, p, ref.ptr, CUDA_R_32F, c.n);
  // bf16 rounds to 8 significant bits, fp16 to 11: allow twice the rounding
  // error, plus a little for fp32 sums taken in another order.
  const float tol = c.dtype == DType::kBFloat16 ? 1.f / 128 : 1.f / 1024;
  const float abs_tol = 1e-3f * std::sqrt(float(c.k)) / 3.f;

  bool ok = true;
  for (int call = 1; call <= kCalls; ++call) {
    CUDA_CHECK(cudaMemsetAsync(d.ptr, 0xFF, size_t(d_rows) * ldd * sizeof(T), dev.stream));
    const cudaError_t err = distfuse::launch_tile_gemm(p, dev.stream, ws_bytes ? workspace : nullptr);
    if (err != cudaSuccess) {
      failures.push_back(describe(c) + ": launch returned " + cudaGetErrorString(err));
      sync_bounded(dev.stream, "after failed launch");
      return false;
    }
    CheckResult init{0, ~0ull, 0};
    CUDA_CHECK(cudaMemcpyAsync(check.ptr, &init, sizeof(init), cudaMemcpyHostToDevice, dev.stream));
    check_output<T><<<1024, 256, 0, dev.stream>>>(d.as<T>(), ldd, c.m, c.n, d_rows,
                                                  ref.as<float>(), tol, abs_tol,
                                                  check.as<CheckResult>());
    CUDA_CHECK(cudaGetLastError());
    CheckResult result;
    std::vector<uint32_t> flag_values(tiles + kGuardFlags);
    CUDA_CHECK(cudaMemcpyAsync(&result, check.ptr, sizeof(result), cudaMemcpyDeviceToHost, dev.stream));
    CUDA_CHECK(cudaMemcpyAsync(flag_values.data(), flags.ptr, flag_values.size() * sizeof(uint32_t),
                               cudaMemcpyDeviceToHost, dev.stream));
    sync_bounded(dev.stream, describe(c).c_str());

    float max_ratio;
    std::memcpy(&max_ratio, &result.max_err_ratio_bits, sizeof(max_ratio));
    if (result.bad != 0) {
      const int64_t row = int64_t(result.first_bad / ldd), col = int64_t(result.first_bad % ldd);
      char buf[200];
      std::snprintf(buf, sizeof(buf), ": call %d: %llu bad elements, first at row %lld col %lld%s",
                    call, result.bad, (long long)row, (long long)col,
                    row < c.m && col < c.n ? "" : " (outside D[:M, :N])");
      failures.push_back(describe(c) + buf);
      ok = false;
    }
    int wrong_flags = 0, first_wrong = -1;
    for (int t = 0; t < tiles + kGuardFlags; ++t) {
      const uint32_t expected = t < tiles ? uint32_t(call) : 0u;
      if (flag_values[t] != expected) {
        if (first_wrong < 0) first_wrong = t;
        ++wrong_flags;
      }
    }
    if (wrong_flags != 0) {
      char buf[200];
      std::snprintf(buf, sizeof(buf), ": call %d: %d of %d tile flags wrong, first #%d = %u",
                    call, wrong_flags, tiles, first_wrong, flag_values[first_wrong]);
      failures.push_back(describe(c) + buf);
      ok = false;
    }
    if (!ok) return false;
    if (call == kCalls) {
      std::printf("  ok  %-58s tiles=%-5d workspace=%-9zu max err/limit %.3f\n",
                  describe(c).c_str(), tiles, ws_bytes, max_ratio);
    }
  }
  return true;
}

bool run_case_any(const Device& dev, const Case& c, void* workspace, size_t capacity,
                  std::vector<std::string>& failures) {
  return c.dtype == DType::kBFloat16
             ? run_case<__nv_bfloat16>(dev, c, workspace, capacity, failures)
             : run_case<__half>(dev, c, workspace, capacity, failures);
}

// Argument checks: each call must return its documented error without launching.
void run_error_cases(const Device& dev, std::vector<std::string>& failures, int& passed) {
  DeviceBuffer buf(1 << 20);
  TileGemmParams good{};
  good.a = good.b = good.d = buf.ptr;
  good.m = 64; good.n = 64; good.k = 64;
  good.lda = good.ldb = good.ldd = 64;
  good.b_transposed = true;
  good.dtype = DType::kBFloat16;
  good.sm_count = dev.sm_count;

  struct ErrorCase {
    const char* name;
    TileGemmParams p;
    cudaError_t expected;
  };
  std::vector<ErrorCase> cases;
  auto with = [&](const char* name, cudaError_t expected, auto change) {
    TileGemmParams p = good;
    change(p);
    cases.push_back({name, p, expected});
  };
  with("K not a multiple of 8", cudaErrorNotSupported, [](TileGemmParams& p) { p.k = 60; p.lda = p.ldb = 60; });
  with("N not a multiple of 8", cudaErrorNotSupported, [](TileGemmParams& p) { p.n = 60; p.ldd = 60; });
  with("fp32 dtype", cudaErrorNotSupported, [](TileGemmParams& p) { p.dtype = DType::kFloat32; });
  with("misaligned A", cudaErrorNotSupported, [](TileGemmParams& p) { p.a = static_cast<const char*>(p.b) + 2; });
  with("lda not a multiple of 8", cudaErrorNotSupported, [](TileGemmParams& p) { p.lda = 68; });
  with("null D", cudaErrorInvalidValue, [](TileGemmParams& p) { p.d = nullptr; });
  with("M = 0", cudaErrorInvalidValue, [](TileGemmParams& p) { p.m = 0; });
  with("lda < K", cudaErrorInvalidValue, [](TileGemmParams& p) { p.lda = 56; });
  with("sm_count = 0", cudaErrorInvalidValue, [](TileGemmParams& p) { p.sm_count = 0; });
  with("sm_count = 2000", cudaErrorInvalidValue, [](TileGemmParams& p) { p.sm_count = 2000; });
  // Stream-K needs the workspace: M=1, N=8192 has 64 tiles for 132 SMs.
  with("missing workspace", cudaErrorInvalidValue, [](TileGemmParams& p) {
    p.m = 1; p.n = 8192; p.k = 2048; p.lda = 2048; p.ldb = 2048; p.ldd = 8192; p.sm_count = 132;
  });
  for (const ErrorCase& e : cases) {
    const bool needs_workspace = distfuse::tile_gemm_workspace_bytes(e.p) > 0;
    if (std::strcmp(e.name, "missing workspace") == 0 && !needs_workspace) {
      failures.push_back(std::string("error case '") + e.name + "': plan has no workspace");
      continue;
    }
    const cudaError_t got = distfuse::launch_tile_gemm(e.p, dev.stream, nullptr);
    if (got != e.expected) {
      failures.push_back(std::string("error case '") + e.name + "': expected " +
                         cudaGetErrorName(e.expected) + ", got " + cudaGetErrorName(got));
    } else {
      ++passed;
    }
  }
  sync_bounded(dev.stream, "error cases");
}

// ---------------------------------------------------------------- timing

// Reads a buffer larger than L2, leaving it full of clean lines: unlike a
// memset, no dirty lines are written back during the timed run.
__global__ void flush_l2(const int4* buffer, int64_t count, int* sink) {
  int acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int4 v = __ldcg(buffer + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x7fffffff) *sink = acc;  // keeps the loads
}

float median_ms(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median ms of each launch, timed in rounds of one run of each in turn: the clocks drift
// by several percent over a run of back-to-back GEMMs, and interleaving spreads that
// drift over every launch alike.
std::vector<float> time_interleaved_ms(const Device& dev, const DeviceBuffer& flush, size_t flush_bytes,
                                       const std::vector<std::function<void()>>& launches) {
  constexpr int kWarmupRounds = 3, kRounds = 50;
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<std::vector<float>> times(launches.size());
  for (int round = -kWarmupRounds; round < kRounds; ++round) {
    for (size_t i = 0; i < launches.size(); ++i) {
      flush_l2<<<1024, 512, 0, dev.stream>>>(flush.as<int4>(), int64_t(flush_bytes / sizeof(int4)),
                                             flush.as<int>());  // evicts A, B and D from L2
      CUDA_CHECK(cudaGetLastError());
      CUDA_CHECK(cudaEventRecord(start, dev.stream));
      launches[i]();
      CUDA_CHECK(cudaEventRecord(stop, dev.stream));
      sync_bounded(dev.stream, "timing");
      float ms;
      CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (round >= 0) times[i].push_back(ms);
    }
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::vector<float> medians;
  for (auto& t : times) medians.push_back(median_ms(t));
  return medians;
}

// `gemm_sms`: the SM budget given to our GEMM (cuBLAS always has the whole GPU).
void run_benchmark(const Device& dev, int gemm_sms, const std::vector<int>& ms_list) {
  std::printf("\nTiming on %s: bf16, B given as Bt [N, K] (nn.Linear weight), median of 50, "
              "L2 flushed before each run, the three columns interleaved; tile GEMM on %d of %d SMs\n",
              dev.name.c_str(), gemm_sms, dev.sm_count);
  std::printf("%6s %5s %5s | %9s %8s %8s %9s | %9s %8s %8s | %7s\n", "M", "K", "N",
              "tile us", "TFLOP/s", "GB/s", "noflag us", "cuBLAS us", "TFLOP/s", "GB/s",
              "speedup");
  const size_t flush_bytes = size_t(512) << 20;
  DeviceBuffer flush(flush_bytes);
  CUDA_CHECK(cudaMemsetAsync(flush.ptr, 0, flush_bytes, dev.stream));
  const int kn_list[][2] = {{2048, 8192}, {7168, 8192}};
  for (const auto& kn : kn_list) {
    const int k = kn[0], n = kn[1];
    for (int m : ms_list) {
      DeviceBuffer a(size_t(m) * k * 2), b(size_t(n) * k * 2), d(size_t(m) * n * 2);
      fill_uniform<<<1024, 256, 0, dev.stream>>>(a.as<__nv_bfloat16>(), int64_t(m) * k, 1);
      fill_uniform<<<1024, 256, 0, dev.stream>>>(b.as<__nv_bfloat16>(), int64_t(n) * k, 2);
      CUDA_CHECK(cudaGetLastError());
      TileGemmParams p{};
      p.a = a.ptr; p.b = b.ptr; p.d = d.ptr;
      p.lda = k; p.ldb = k; p.ldd = n;
      p.m = m; p.n = n; p.k = k;
      p.b_transposed = true;
      p.dtype = DType::kBFloat16;
      p.sm_count = gemm_sms;
      DeviceBuffer flags(size_t(tiles_of(p)) * sizeof(uint32_t));
      CUDA_CHECK(cudaMemsetAsync(flags.ptr, 0, size_t(tiles_of(p)) * sizeof(uint32_t), dev.stream));
      const size_t ws_bytes = distfuse::tile_gemm_workspace_bytes(p);
      DeviceBuffer workspace(ws_bytes);
      CUDA_CHECK(cudaMemsetAsync(workspace.ptr, 0, ws_bytes, dev.stream));

      auto launch_with = [&](uint32_t* tile_flags) {
        TileGemmParams q = p;
        q.tile_flags = tile_flags;
        const cudaError_t err = distfuse::launch_tile_gemm(q, dev.stream, workspace.ptr);
        if (err != cudaSuccess) fatal("launch_tile_gemm", cudaGetErrorString(err), __FILE__, __LINE__);
      };
      const std::vector<float> ms = time_interleaved_ms(
          dev, flush, flush_bytes,
          {[&] { launch_with(flags.as<uint32_t>()); }, [&] { launch_with(nullptr); },
           [&] { cublas_gemm(dev, p, d.ptr, CUDA_R_16BF, n); }});
      const float ours = ms[0], no_flags = ms[1], cublas = ms[2];
      const double flop = 2.0 * m * n * k;
      const double bytes = 2.0 * (double(m) * k + double(k) * n + double(m) * n);
      std::printf("%6d %5d %5d | %9.1f %8.1f %8.0f %9.1f | %9.1f %8.1f %8.0f | %7.2f\n", m, k, n,
                  ours * 1e3, flop / ours * 1e-9, bytes / ours * 1e-6, no_flags * 1e3,
                  cublas * 1e3, flop / cublas * 1e-9, bytes / cublas * 1e-6, cublas / ours);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool bench = !(argc > 1 && std::strcmp(argv[1], "--no-bench") == 0);
  Device dev;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  if (prop.major != 9) {
    std::fprintf(stderr, "needs an sm_90 GPU, found %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    return 2;
  }
  dev.name = prop.name;
  dev.sm_count = prop.multiProcessorCount;
  CUDA_CHECK(cudaStreamCreateWithFlags(&dev.stream, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&dev.cublas));
  CUBLAS_CHECK(cublasSetStream(dev.cublas, dev.stream));

  std::vector<Case> cases;
  for (DType dtype : {DType::kBFloat16, DType::kFloat16})
    for (bool bt : {false, true})
      for (int m : {1, 3, 8, 128, 1000, 4097})
        for (auto nk : {std::pair{8192, 2048}, std::pair{8192, 1024}, std::pair{264, 136}})
          cases.push_back({dtype, bt, m, nk.first, nk.second, dev.sm_count, 0});
  // Other SM budgets exercise the stream-K splits of both configurations.
  for (bool bt : {false, true})
    for (int sms : {1, 5, 37, dev.sm_count - 16})
      for (int m : {1, 128, 129, 256, 1000})
        for (auto nk : {std::pair{8192, 1024}, std::pair{264, 136}, std::pair{1024, 4096}})
          cases.push_back({DType::kBFloat16, bt, m, nk.first, nk.second, sms, 0});
  // Padded leading dimensions.
  for (DType dtype : {DType::kBFloat16, DType::kFloat16})
    for (bool bt : {false, true})
      for (int m : {3, 200})
        cases.push_back({dtype, bt, m, 264, 1024, dev.sm_count, 8});

  // One workspace for every case, zeroed once.
  size_t capacity = 0;
  for (const Case& c : cases) {
    TileGemmParams p{};
    p.a = p.b = p.d = reinterpret_cast<void*>(uintptr_t(256));
    p.m = c.m; p.n = c.n; p.k = c.k;
    p.lda = c.k + c.pad; p.ldb = (c.b_transposed ? c.k : c.n) + c.pad; p.ldd = c.n + c.pad;
    p.b_transposed = c.b_transposed;
    p.dtype = c.dtype;
    p.sm_count = c.sm_count;
    capacity = std::max(capacity, distfuse::tile_gemm_workspace_bytes(p));
  }
  DeviceBuffer workspace(capacity);
  CUDA_CHECK(cudaMemset(workspace.ptr, 0, capacity));

  std::printf("Correctness on %s (%d SMs), %zu cases, workspace %zu bytes\n", prop.name,
              dev.sm_count, cases.size(), capacity);
  std::vector<std::string> failures;
  int passed = 0;
  for (const Case& c : cases) passed += run_case_any(dev, c, workspace.ptr, capacity, failures);
  run_error_cases(dev, failures, passed);

  if (bench && failures.empty()) {
    run_benchmark(dev, dev.sm_count, {1, 8, 32, 128, 512, 2048, 4096, 8192, 16384});
    // As in the fused ops, where some SMs run the communication kernels (the band
    // schedules: 10 at W = 4 down_proj M = 8192, 16 at M = 2048 and 4096).
    run_benchmark(dev, dev.sm_count - 10, {2048, 4096, 8192, 16384});
    run_benchmark(dev, dev.sm_count - 16, {1, 32, 128, 512, 2048, 4096});
  }

  std::printf("\n%d passed, %zu failed\n", passed, failures.size());
  for (const std::string& f : failures) std::printf("FAIL %s\n", f.c_str());
  if (failures.empty()) std::printf("ALL PASS\n");
  cublasDestroy(dev.cublas);
  cudaStreamDestroy(dev.stream);
  return failures.empty() ? 0 : 1;
}
