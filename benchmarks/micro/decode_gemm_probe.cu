// Probe: the skinny GEMM of the decode schedule alone (no communication) against
// plain HBM reads of the same bytes, one GPU, L2 flushed before every sample.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc -Icsrc/include [-DDF_DECODE_MAX_STAGES=8 -DDF_DECODE_BLOCK_K=128 \
//        -DDF_DECODE_PROBE_SKIP_LOADS=1 ...] \
//        benchmarks/micro/decode_gemm_probe.cu -o decode_gemm_probe
//   ./decode_gemm_probe            # prints one line per (K, M)
//
// Each sample replays a CUDA graph of 10 calls on 10 distinct weight sets, so no
// call reads weights from L2; µs per call = replay time / 10 (median of 30).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/gemm/decode_matmul_all_reduce.cu"

#include "probe_check.h"

// Reads `bytes` with 16-byte loads, `kUnroll` in flight per thread; grid-stride.
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

__global__ void fill_random(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    p[i] = uint16_t(0x3c00 | (x & 0x03ff)) ^ uint16_t((x >> 16) & 0x8000);  // bf16-ish values of moderate size
  }
}

template <typename F>
float time_graph(cudaStream_t s, void* flush, size_t flush_bytes, F enqueue_ten) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  enqueue_ten();
  CHECK(cudaStreamEndCapture(s, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int it = 0; it < 35; ++it) {
    CHECK(cudaMemsetAsync(flush, it, flush_bytes, s));
    CHECK(cudaEventRecord(a, s));
    CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (it >= 5) t.push_back(ms * 1000.f / 10.f);
  }
  std::sort(t.begin(), t.end());
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  return t[t.size() / 2];
}

int main() {
  using namespace distfuse;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs; stages cap %d, smem cap %d KB, %d-deep K stages\n", prop.name, sms,
              DF_DECODE_MAX_STAGES, DF_DECODE_MAX_SMEM_KB, DF_DECODE_BLOCK_K);
  cudaStream_t s;
  CHECK(cudaStreamCreate(&s));
  const size_t flush_bytes = 256ull << 20;
  void* flush;
  CHECK(cudaMalloc(&flush, flush_bytes));
  uint4* sink;
  CHECK(cudaMalloc(&sink, 64));
  const int n = 8192;
  for (int k : {2048, 7168, 14336}) {
    std::vector<uint16_t*> w(10);
    for (auto& p : w) {
      CHECK(cudaMalloc(&p, size_t(n) * k * 2));
      fill_random<<<1024, 256>>>(p, int64_t(n) * k, uint32_t(size_t(p)));
    }
    uint16_t *a, *out;
    CHECK(cudaMalloc(&a, size_t(128) * k * 2));
    CHECK(cudaMalloc(&out, size_t(128) * n * 2));
    fill_random<<<256, 256>>>(a, int64_t(128) * k, 7);
    CHECK(cudaDeviceSynchronize());
    const double mb = double(n) * k * 2 / 1e6;
    const float read = time_graph(s, flush, flush_bytes, [&] {
      for (int i = 0; i < 10; ++i)
        read_kernel<8><<<sms * 4, 256, 0, s>>>(reinterpret_cast<const uint4*>(w[i]), int64_t(n) * k / 8, sink);
    });
    std::printf("K=%5d  %.1f MB  plain read: %6.1f us (%5.0f GB/s)\n", k, mb, read, mb * 1e3 / read);
    for (int m : {1, 8, 16, 32, 128}) {
      {
        const int ctas = sms;
        DecodeMatmulAllReduceParams p{};
        p.a = a;
        p.output = out;
        p.lda = k;
        p.ldb = k;
        p.m = m;
        p.n = n;
        p.k = k;
        p.b_transposed = true;
        p.dtype = DType::kBFloat16;
        p.all_reduce = false;
        p.sm_count = ctas;
        const float t = time_graph(s, flush, flush_bytes, [&] {
          for (int i = 0; i < 10; ++i) {
            p.b = w[i];
            CHECK(launch_decode_matmul_all_reduce(p, s));
          }
        });
        std::printf("K=%5d  M=%3d  decode GEMM: %6.1f us (%5.0f GB/s)\n", k, m, t, mb * 1e3 / t);
      }
    }
    for (auto p : w) CHECK(cudaFree(p));
    CHECK(cudaFree(a));
    CHECK(cudaFree(out));
  }
  return 0;
}
