// What the standalone probes share: CHECK(call), which stops at the first failing CUDA
// call and names it; GPUs 0 and 1 with access to each other's memory; random bf16 fills;
// the median of a set of timings.
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

inline float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace probe
