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

#include "decode_probe_params.h"
#include "probe_check.h"

__global__ void fill_random(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    p[i] = uint16_t(0x3c00 | (x & 0x03ff)) ^ uint16_t((x >> 16) & 0x8000);  // bf16-ish values of moderate size
  }
}

int main() {
  using namespace distfuse;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs; stages cap %d, smem cap %d KB, %d-deep K stages\n", prop.name, sms,
              DF_DECODE_MAX_STAGES, DF_DECODE_MAX_SMEM_KB, DF_DECODE_BLOCK_K);
  const probe::Timing timing = probe::make_timing();
  cudaStream_t s = timing.stream;
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
    const float read = probe::time_graph_of_ten(timing, [&](int i) {
      probe::read_kernel<8><<<sms * 4, 256, 0, s>>>(reinterpret_cast<const uint4*>(w[i]), int64_t(n) * k / 8,
                                                      timing.sink);
    });
    std::printf("K=%5d  %.1f MB  plain read: %6.1f us (%5.0f GB/s)\n", k, mb, read, mb * 1e3 / read);
    for (int m : {1, 8, 16, 32, 128}) {
      {
        DecodeMatmulAllReduceParams p = probe::gemm_only_params(a, out, m, n, k, sms);
        const float t = probe::time_graph_of_ten(timing, [&](int i) {
          p.b = w[i];
          CHECK(launch_decode_matmul_all_reduce(p, s));
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
