// How fast can a few SMs move bytes over NVLink? Design data for the overlapped
// schedules (benchmarks/NOTES.md: the tile consumers reached only 4-8 GB/s per SM).
//
// One process, GPU 0 and GPU 1 with peer access. Each measurement moves `bytes`
// from a buffer on GPU 0 to a buffer on GPU 1 (push: GPU 0's SMs store to peer
// memory) or from GPU 1 to GPU 0 (pull: GPU 0's SMs load from peer memory), with
// CTAs x threads, `unroll` 16-byte vectors in flight per thread, and optionally a
// system-scope fence + flag store every `fence_kb` kilobytes per CTA (the release
// a consumer makes before raising a flag). Also: the copy engine
// (cudaMemcpyPeerAsync), which uses no SM at all; and all-to-all traffic on every
// visible GPU at once (each GPU sends a piece to every other GPU and receives one
// from each, by stores or by loads), the pattern of a band all-reduce, where every
// link carries data both ways.
//
//   nvcc -O3 -arch=sm_90a -o /tmp/nvlink_probe benchmarks/micro/nvlink_probe.cu
//   /tmp/nvlink_probe [MB]        # prints the tables, a line per configuration
//   /tmp/nvlink_probe [MB] a2a    # the all-to-all table only
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "probe_check.h"

struct Probe {
  const uint4* src;
  uint4* dst;
  unsigned* flag;      // on the destination side; written after each fenced piece
  long long vectors;   // 16-byte vectors in total
  long long fence_vectors;  // vectors per CTA between two releases (0: never)
};

template <int U>
__global__ void move_kernel(Probe p) {
  // CTA c moves the contiguous pieces c, c + G, c + 2G, ... of fence_vectors (or
  // of blockDim * U vectors when there is no fence).
  const long long piece = p.fence_vectors > 0 ? p.fence_vectors : (long long)blockDim.x * U;
  const long long pieces = (p.vectors + piece - 1) / piece;
  for (long long q = blockIdx.x; q < pieces; q += gridDim.x) {
    const long long begin = q * piece;
    const long long end = begin + piece < p.vectors ? begin + piece : p.vectors;
    for (long long base = begin + threadIdx.x; base < end; base += (long long)blockDim.x * U) {
      uint4 x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long i = base + (long long)u * blockDim.x;
        if (i < end) x[u] = __ldcg(p.src + i);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long i = base + (long long)u * blockDim.x;
        if (i < end) p.dst[i] = x[u];
      }
    }
    if (p.fence_vectors > 0) {
      __syncthreads();
      if (threadIdx.x == 0)
        asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p.flag + blockIdx.x), "r"((unsigned)q) : "memory");
    }
  }
}

template <int U>
float time_kernel(const Probe& p, int ctas, int threads, cudaStream_t s) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  move_kernel<U><<<ctas, threads, 0, s>>>(p);  // warm-up
  CHECK(cudaGetLastError());
  CHECK(cudaEventRecord(a, s));
  const int reps = 5;
  for (int r = 0; r < reps; ++r) move_kernel<U><<<ctas, threads, 0, s>>>(p);
  CHECK(cudaGetLastError());
  CHECK(cudaEventRecord(b, s));
  CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms / reps;
}

float time_kernel_u(int unroll, const Probe& p, int ctas, int threads, cudaStream_t s) {
  switch (unroll) {
    case 1: return time_kernel<1>(p, ctas, threads, s);
    case 2: return time_kernel<2>(p, ctas, threads, s);
    case 4: return time_kernel<4>(p, ctas, threads, s);
    default: return time_kernel<8>(p, ctas, threads, s);
  }
}

using probe::AllToAll;
using probe::all_to_all_kernel;
using probe::kMaxGpus;

// Every visible GPU (all pairs with peer access) at once: GPU g sends `piece` bytes
// to each peer and receives `piece` from each. GB/s per GPU per direction, timed on
// every GPU, the slowest counted.
void all_to_all(int gpus, size_t piece) {
  std::vector<void*> send(gpus), recv(gpus);
  std::vector<cudaStream_t> streams(gpus);
  std::vector<cudaEvent_t> start(gpus), stop(gpus);
  probe::enable_peer_access(gpus);
  for (int g = 0; g < gpus; ++g) {
    CHECK(cudaSetDevice(g));
    CHECK(cudaMalloc(&send[g], piece * (gpus - 1)));
    CHECK(cudaMemset(send[g], g + 1, piece * (gpus - 1)));
    CHECK(cudaMalloc(&recv[g], piece * (gpus - 1)));
    CHECK(cudaStreamCreateWithFlags(&streams[g], cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&start[g]));
    CHECK(cudaEventCreate(&stop[g]));
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("\nall-to-all on %d GPUs, %zu MB to and from each peer per GPU (GB/s per GPU, one direction)\n",
              gpus, piece >> 20);
  std::printf("%-5s %5s %7s %6s %10s\n", "mode", "CTAs", "threads", "unroll", "GB/s");
  // Slot of GPU g's piece for peer h (k-th peer after g): send[g] + k, recv[h] + the
  // slot of g among h's peers.
  auto slot = [&](int from, int to) { return (to - from + gpus) % gpus - 1; };
  const long long vectors = (long long)(piece / 16);
  for (int pull = 0; pull < 2; ++pull) {
    for (int unroll : {4, 8}) {
      for (int ctas : {8, 16, 32, 64, 132}) {
        if (ctas > prop.multiProcessorCount) continue;
        const int threads = 512, reps = 5;
        for (int rep = -1; rep < reps; ++rep) {  // rep -1: warm-up, untimed
          for (int g = 0; g < gpus; ++g) {
            AllToAll p{};
            p.pieces = gpus - 1;
            p.vectors = vectors;
            for (int k = 0; k < gpus - 1; ++k) {
              const int h = (g + 1 + k) % gpus;
              // push: GPU g stores its piece for h into h's memory; pull: GPU g loads
              // h's piece for g out of h's memory.
              const int owner_of_src = pull ? h : g, src_to = pull ? g : h;
              const int owner_of_dst = pull ? g : h, dst_from = pull ? h : g;
              p.src[k] = static_cast<const uint4*>(send[owner_of_src]) + slot(owner_of_src, src_to) * vectors;
              p.dst[k] = static_cast<uint4*>(recv[owner_of_dst]) + slot(owner_of_dst, dst_from) * vectors;
            }
            CHECK(cudaSetDevice(g));
            if (rep == 0) CHECK(cudaEventRecord(start[g], streams[g]));
            if (unroll == 4) all_to_all_kernel<4><<<ctas, threads, 0, streams[g]>>>(p);
            else all_to_all_kernel<8><<<ctas, threads, 0, streams[g]>>>(p);
            CHECK(cudaGetLastError());
            if (rep == reps - 1) CHECK(cudaEventRecord(stop[g], streams[g]));
          }
          if (rep == -1)
            for (int g = 0; g < gpus; ++g) CHECK(cudaStreamSynchronize(streams[g]));
        }
        float worst = 0;
        for (int g = 0; g < gpus; ++g) {
          CHECK(cudaEventSynchronize(stop[g]));
          float ms = 0;
          CHECK(cudaEventElapsedTime(&ms, start[g], stop[g]));
          worst = ms > worst ? ms : worst;
        }
        const double gbs = double(piece) * (gpus - 1) * reps / (worst * 1e-3) / 1e9;
        std::printf("%-5s %5d %7d %6d %10.1f\n", pull ? "pull" : "push", ctas, threads, unroll, gbs);
      }
    }
  }
  for (int g = 0; g < gpus; ++g) {
    CHECK(cudaSetDevice(g));
    CHECK(cudaFree(send[g]));
    CHECK(cudaFree(recv[g]));
    CHECK(cudaStreamDestroy(streams[g]));
    CHECK(cudaEventDestroy(start[g]));
    CHECK(cudaEventDestroy(stop[g]));
  }
  CHECK(cudaSetDevice(0));
}

int main(int argc, char** argv) {
  const size_t mb = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 128;
  const size_t bytes = mb << 20;
  const bool a2a_only = argc > 2 && std::string(argv[2]) == "a2a";
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("needs 2 GPUs, found %d\n", n);
    return 1;
  }
  if (a2a_only) {
    all_to_all(n < kMaxGpus ? n : kMaxGpus, bytes / 4);
    return 0;
  }
  int can01 = 0, can10 = 0;
  CHECK(cudaDeviceCanAccessPeer(&can01, 0, 1));
  CHECK(cudaDeviceCanAccessPeer(&can10, 1, 0));
  if (!can01 || !can10) {
    std::printf("GPU 0 and 1 have no peer access\n");
    return 1;
  }
  void *buf0, *buf1;
  unsigned *flags0, *flags1;
  CHECK(cudaSetDevice(1));
  CHECK(cudaDeviceEnablePeerAccess(0, 0));
  CHECK(cudaMalloc(&buf1, bytes));
  CHECK(cudaMemset(buf1, 1, bytes));
  CHECK(cudaMalloc(&flags1, 4096 * sizeof(unsigned)));
  CHECK(cudaSetDevice(0));
  CHECK(cudaDeviceEnablePeerAccess(1, 0));
  CHECK(cudaMalloc(&buf0, bytes));
  CHECK(cudaMemset(buf0, 2, bytes));
  CHECK(cudaMalloc(&flags0, 4096 * sizeof(unsigned)));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));

  std::printf("%s, %zu MB per measurement, GPU 0 <-> GPU 1\n", prop.name, mb);
  std::printf("%-5s %5s %7s %6s %9s %10s %12s\n", "mode", "CTAs", "threads", "unroll", "fence KB",
              "GB/s", "GB/s per CTA");
  const long long vectors = (long long)(bytes / 16);
  const int ctas_list[] = {4, 8, 16, 24, 32, 48, 64, 96, 132};
  for (int mode = 0; mode < 2; ++mode) {  // 0: push (store to peer), 1: pull (load from peer)
    Probe p;
    p.src = static_cast<const uint4*>(mode == 0 ? buf0 : buf1);
    p.dst = static_cast<uint4*>(mode == 0 ? buf1 : buf0);
    p.flag = mode == 0 ? flags1 : flags0;
    p.vectors = vectors;
    for (int threads : {256, 512, 1024}) {
      for (int unroll : {1, 4, 8}) {
        if (threads == 1024 && unroll == 8) continue;  // registers
        for (long long fence_kb : {0LL, 64LL, 256LL}) {
          if (fence_kb && (threads != 512 || unroll != 8)) continue;
          p.fence_vectors = fence_kb * 1024 / 16;
          for (int ctas : ctas_list) {
            if (ctas > prop.multiProcessorCount) continue;
            const float ms = time_kernel_u(unroll, p, ctas, threads, s);
            const double gbs = bytes / (ms * 1e-3) / 1e9;
            std::printf("%-5s %5d %7d %6d %9lld %10.1f %12.2f\n", mode == 0 ? "push" : "pull", ctas,
                        threads, unroll, fence_kb, gbs, gbs / ctas);
          }
        }
      }
    }
  }
  // The copy engine: no SM involved. Push (GPU 0 copies into GPU 1) and pull (GPU 1
  // copies from GPU 0), by copy size: the band schedule moves a few MB per copy.
  cudaStream_t s1;
  CHECK(cudaSetDevice(1));
  CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  CHECK(cudaSetDevice(0));
  for (int pull = 0; pull < 2; ++pull) {
    cudaStream_t cs = pull ? s1 : s;
    CHECK(cudaSetDevice(pull ? 1 : 0));
    for (size_t piece : {size_t(1) << 20, size_t(4) << 20, size_t(16) << 20, bytes}) {
      if (piece > bytes) continue;
      cudaEvent_t a, b;
      CHECK(cudaEventCreate(&a));
      CHECK(cudaEventCreate(&b));
      CHECK(cudaMemcpyPeerAsync(buf1, 1, buf0, 0, piece, cs));
      CHECK(cudaEventRecord(a, cs));
      const int reps = int(bytes / piece) * 2;
      for (int r = 0; r < reps; ++r)
        CHECK(cudaMemcpyPeerAsync(static_cast<char*>(buf1) + (r * piece) % bytes, 1,
                                  static_cast<char*>(buf0) + (r * piece) % bytes, 0, piece, cs));
      CHECK(cudaEventRecord(b, cs));
      CHECK(cudaEventSynchronize(b));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      std::printf("copy engine %s 0 -> 1, %6zu KB copies: %.1f GB/s, %.1f us per copy\n",
                  pull ? "pull (GPU 1 issues)" : "push (GPU 0 issues)", piece >> 10,
                  double(piece) * reps / (ms * 1e-3) / 1e9, ms * 1e3 / reps);
      CHECK(cudaEventDestroy(a));
      CHECK(cudaEventDestroy(b));
    }
  }
  CHECK(cudaSetDevice(0));
  all_to_all(n < kMaxGpus ? n : kMaxGpus, bytes / 4);
  return 0;
}
