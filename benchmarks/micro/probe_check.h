// What the standalone probes share: CHECK(call), which stops at the first failing CUDA
// call and names it (CHECK_CUBLAS the same for cuBLAS, in probes that include it); GPUs 0
// and 1 with access to each other's memory; random bf16 fills; the median of a set of
// timings; plain 16-byte reads; all-to-all copies between GPUs; graphs of ten calls timed
// after an L2 flush.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                               \
  do {                                                                                            \
    cudaError_t err_ = (call);                                                                    \
    if (err_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

#define CHECK_CUBLAS(call)                                                                     \
  do {                                                                                         \
    cublasStatus_t st_ = (call);                                                               \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                        \
      std::fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #call, int(st_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

namespace probe {

// bf16 in [-2, 2): sign, exponent 126-127, 7 random mantissa bits; never zero.
__global__ void fill_random(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    p[i] = uint16_t(((x >> 16) & 0x8000) | ((126 + ((x >> 8) & 1)) << 7) | (x & 0x7f));
  }
}

// GPUs 0 and 1, each with access to the other's memory; exits if there are fewer or
// they cannot reach each other.
inline void enable_peer_pair() {
  int count = 0;
  CHECK(cudaGetDeviceCount(&count));
  if (count < 2) {
    std::fprintf(stderr, "needs 2 GPUs, found %d\n", count);
    std::exit(1);
  }
  for (int i = 0; i < 2; ++i) {
    CHECK(cudaSetDevice(i));
    int can = 0;
    CHECK(cudaDeviceCanAccessPeer(&can, i, 1 - i));
    if (!can) {
      std::fprintf(stderr, "GPU %d cannot access GPU %d\n", i, 1 - i);
      std::exit(1);
    }
    CHECK(cudaDeviceEnablePeerAccess(1 - i, 0));
  }
}

// Every pair of GPUs 0 .. gpus - 1 with access to each other's memory (already enabled
// is fine); leaves GPU gpus - 1 current.
inline void enable_peer_access(int gpus) {
  for (int g = 0; g < gpus; ++g) {
    CHECK(cudaSetDevice(g));
    for (int h = 0; h < gpus; ++h) {
      if (h == g) continue;
      const cudaError_t e = cudaDeviceEnablePeerAccess(h, 0);
      if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) CHECK(e);
      (void)cudaGetLastError();
    }
  }
}

inline float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Reads `n` 16-byte words with `kUnroll` loads in flight per thread; grid-stride.
template <int kUnroll>
__global__ void read_kernel(const uint4* p, int64_t n, uint4* sink) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride * kUnroll) {
    uint4 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) x[u] = i + u * stride < n ? __ldcs(p + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc.x ^= x[u].x ^ x[u].y ^ x[u].z ^ x[u].w;
  }
  if (acc.x == 0x12345678u) sink[0] = acc;
}

// All-to-all traffic of one GPU: piece k of `vectors` 16-byte words from src[k] to dst[k],
// one side of each in a peer's memory (stores to peers: a push; loads from them: a pull).
// The pieces laid end to end; each thread keeps U words in flight.
constexpr int kMaxGpus = 8;
struct AllToAll {
  const uint4* src[kMaxGpus - 1];
  uint4* dst[kMaxGpus - 1];
  int pieces;
  long long vectors;
};
template <int U>
__global__ void all_to_all_kernel(AllToAll p) {
  const long long total = p.vectors * p.pieces;
  const long long stride = (long long)gridDim.x * blockDim.x * U;
  for (long long base = (long long)blockIdx.x * blockDim.x * U + threadIdx.x; base < total; base += stride) {
    uint4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long i = base + (long long)u * blockDim.x;
      if (i < total) x[u] = __ldcg(p.src[i / p.vectors] + i % p.vectors);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long i = base + (long long)u * blockDim.x;
      if (i < total) p.dst[i / p.vectors][i % p.vectors] = x[u];
    }
  }
}

// µs per call of a CUDA graph of ten calls, call i enqueued by enqueue_call(i) (each on
// its own weights, so none reads them from L2), each replay after an L2 flush (a memset
// of the timing's buffer); the median of `replays` replays after 5 warm-ups (1 for a
// quick screen of fewer than 10).
// The stream the timed probes enqueue on, a 256 MB buffer whose memset flushes L2, and a
// sink for the plain reads.
struct Timing {
  cudaStream_t stream;
  void* flush;
  size_t flush_bytes;
  uint4* sink;
};
inline Timing make_timing() {
  Timing t{};
  t.flush_bytes = 256ull << 20;
  CHECK(cudaStreamCreate(&t.stream));
  CHECK(cudaMalloc(&t.flush, t.flush_bytes));
  CHECK(cudaMalloc(&t.sink, 64));
  return t;
}

template <typename F>
float time_graph_of_ten(const Timing& timing, F enqueue_call, int replays = 30) {
  cudaStream_t s = timing.stream;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < 10; ++i) enqueue_call(i);
  CHECK(cudaStreamEndCapture(s, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  const int warmups = replays >= 10 ? 5 : 1;
  for (int it = 0; it < replays + warmups; ++it) {
    CHECK(cudaMemsetAsync(timing.flush, it, timing.flush_bytes, s));
    CHECK(cudaEventRecord(a, s));
    CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (it >= warmups) t.push_back(ms * 1000.f / 10.f);
  }
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return median(t);
}

}  // namespace probe
