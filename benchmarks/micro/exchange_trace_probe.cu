// Probe: where the pair exchange's time goes after the GEMM (W = 2, two GPUs in one
// process). The tile GEMM with its pair exchange (kernels/gemm/tile_pair_exchange.cuh)
// runs on GPUs 0 and 1 at once, released together by a gate kernel on each that waits
// for a flag in GPU 0's memory, written by a copy on a side stream once both launches
// are queued. Built with -DDISTFUSE_EXCHANGE_TRACE, one
// thread of each CTA stamps the global timer at every step of its exchange
// (ExchangeTraceStep), just past the workspace layout's end. Printed per GPU: each step's
// time from the kernel's start (min / median / max over CTAs) and the medians of the
// last tile's steps, beside the same GEMM without the exchange (same plan), all timed
// with events, interleaved, the L2 flushed before each sample. The fused outputs are
// checked: the same bits on both GPUs, equal to round(P0 + P1) of the plain GEMMs.
//
//   C=.venv/lib/python3.11/site-packages/cutlass_library/source
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -DDISTFUSE_EXCHANGE_TRACE -Icsrc -Icsrc/include -I$C/include -I$C/tools/util/include \
//        benchmarks/micro/exchange_trace_probe.cu csrc/kernels/gemm/tile_gemm.cu -o exchange_trace_probe
//   ./exchange_trace_probe M N K [tile_shape=2] [rounds=30] [consumer_tail=1]
//
// tile_shape as TileGemmParams (1 64x128, 2 128x128, 3 128x256); consumer_tail 0: the
// exchange warps take every tile.
#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "distfuse/comm/handle.h"
#include "distfuse/params.h"
#include "distfuse/tuning.h"
#include "kernels/gemm/tile_gemm.h"
#include "kernels/gemm/tile_pair_exchange.cuh"
#include "probe_check.h"

using namespace distfuse;

namespace {

__global__ void flush_l2(const int4* buffer, int64_t count, int* sink) {
  int acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int4 v = __ldcg(buffer + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x7fffffff) *sink = acc;
}

// Holds the stream until *gate holds `value` (bounded: 20 s; the exchange's waits: 5 s).
__global__ void wait_gate(const volatile uint32_t* gate, uint32_t value) {
  const uint64_t start = global_timer_ns();
  while (*gate != value)
    if (global_timer_ns() - start > 20ull * 1000 * 1000 * 1000) __trap();
}

struct Rank {
  cudaStream_t stream;
  __nv_bfloat16 *a, *w, *out, *plain;
  unsigned char* ws;
  void* scratch;
  int4* flush;
  int* sink;
  cudaEvent_t start, stop;
  TileGemmParams fused, alone;
};

constexpr size_t kFlushBytes = size_t(512) << 20;

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s M N K [tile_shape=2] [rounds=30] [consumer_tail=1]\n", argv[0]);
    return 2;
  }
  const int m = std::atoi(argv[1]), n = std::atoi(argv[2]), k = std::atoi(argv[3]);
  const int tile_shape = argc > 4 ? std::atoi(argv[4]) : 2;
  const int rounds = argc > 5 ? std::atoi(argv[5]) : 30;
  const bool consumer_tail = argc > 6 ? std::atoi(argv[6]) != 0 : true;
  probe::enable_peer_pair();
  const WorkspaceLayout layout = make_layout(2, tile_region_bytes_for_output(uint64_t(m) * n * 2, 2));

  Rank rank[2];
  int sms = 0;
  for (int r = 0; r < 2; ++r) {
    Rank& R = rank[r];
    CHECK(cudaSetDevice(r));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, r));
    CHECK(cudaStreamCreateWithFlags(&R.stream, cudaStreamNonBlocking));
    CHECK(cudaMalloc(&R.a, size_t(m) * k * 2));
    CHECK(cudaMalloc(&R.w, size_t(n) * k * 2));
    CHECK(cudaMalloc(&R.out, size_t(m) * n * 2));
    CHECK(cudaMalloc(&R.plain, size_t(m) * n * 2));
    const size_t trace_bytes = size_t(kMaxWorld) * 1024 * kExchangeTraceSlots * 8;
    CHECK(cudaMalloc(&R.ws, layout.total_bytes + trace_bytes));
    CHECK(cudaMemset(R.ws, 0, layout.total_bytes + trace_bytes));
    CHECK(cudaMalloc(&R.flush, kFlushBytes));
    CHECK(cudaMemset(R.flush, 0, kFlushBytes));
    CHECK(cudaMalloc(&R.sink, sizeof(int)));
    CHECK(cudaEventCreate(&R.start));
    CHECK(cudaEventCreate(&R.stop));
    probe::fill_random<<<1024, 256, 0, R.stream>>>(reinterpret_cast<uint16_t*>(R.a), int64_t(m) * k, 11 + r);
    probe::fill_random<<<1024, 256, 0, R.stream>>>(reinterpret_cast<uint16_t*>(R.w), int64_t(n) * k, 23 + r);
    CHECK(cudaGetLastError());
  }
  for (int r = 0; r < 2; ++r) {
    Rank& R = rank[r];
    CommHandle c{};
    c.peer_base[0] = rank[0].ws;
    c.peer_base[1] = rank[1].ws;
    c.rank = r;
    c.world = 2;
    c.timeout_ns = 5ull * 1000 * 1000 * 1000;
    c.layout = layout;
    TileGemmParams p{};
    p.a = R.a;
    p.b = R.w;
    p.lda = k;
    p.ldb = k;
    p.ldd = n;
    p.m = m;
    p.n = n;
    p.k = k;
    p.b_transposed = true;
    p.dtype = DType::kBFloat16;
    p.whole_tiles = true;
    p.tile_shape = tile_shape;
    const int64_t tiles = int64_t((m + tile_gemm_tile_m(p) - 1) / tile_gemm_tile_m(p)) *
                          ((n + tile_gemm_tile_n(p) - 1) / tile_gemm_tile_n(p));
    p.sm_count = exchange_ctas(tiles, sms);
    R.alone = p;
    R.alone.d = R.plain;
    R.fused = p;
    R.fused.d = R.ws + layout.tiles_offset;
    R.fused.exchange_output = R.out;
    R.fused.comm = c;
    R.fused.exchange_last_tile_in_consumers = consumer_tail;
    CHECK(cudaSetDevice(r));
    const size_t scratch = tile_gemm_workspace_bytes(p);
    CHECK(cudaMalloc(&R.scratch, std::max<size_t>(scratch, 256)));
    CHECK(cudaMemset(R.scratch, 0, std::max<size_t>(scratch, 256)));
    if (r == 0)
      std::printf("M = %d, N = %d, K = %d, bf16, B = weight.t(); tiles %d x %d, %lld tiles on %d CTAs; last tile: %s\n",
                  m, n, k, tile_gemm_tile_m(p), tile_gemm_tile_n(p), (long long)tiles, p.sm_count,
                  consumer_tail ? "consumers" : "exchange warps");
  }

  // The gate: a word in GPU 0's memory that both GPUs poll; the host's value comes by a copy
  // on a side stream of GPU 0.
  CHECK(cudaSetDevice(0));
  uint32_t* gate = nullptr;
  uint32_t* gate_values = nullptr;
  cudaStream_t opener;
  CHECK(cudaMalloc(&gate, sizeof(uint32_t)));
  CHECK(cudaMemset(gate, 0, sizeof(uint32_t)));
  CHECK(cudaHostAlloc(&gate_values, 4096 * sizeof(uint32_t), cudaHostAllocDefault));
  CHECK(cudaStreamCreateWithFlags(&opener, cudaStreamNonBlocking));
  CHECK(cudaDeviceSynchronize());

  // One sample of `which` (0 alone, 1 fused) on both GPUs, released together; µs per GPU.
  uint32_t gate_value = 0;
  auto sample = [&](int which, float* us) {
    ++gate_value;
    gate_values[gate_value % 4096] = gate_value;
    const auto t_host = std::chrono::steady_clock::now();
    auto check = [&](cudaError_t err, const char* what) {
      if (err == cudaSuccess) return;
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_host).count();
      std::fprintf(stderr, "%s failed after %.1f s in a %s sample: %s (a gate trap takes 20 s, an exchange "
                   "timeout 5 s)\n", what, s, which ? "fused" : "GEMM-alone", cudaGetErrorString(err));
      std::exit(1);
    };
    for (int r = 0; r < 2; ++r) {
      Rank& R = rank[r];
      CHECK(cudaSetDevice(r));
      flush_l2<<<1024, 512, 0, R.stream>>>(R.flush, int64_t(kFlushBytes / sizeof(int4)), R.sink);
      wait_gate<<<1, 1, 0, R.stream>>>(gate, gate_value);
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(R.start, R.stream));
      CHECK(launch_tile_gemm(which ? R.fused : R.alone, R.stream, R.scratch));
      CHECK(cudaEventRecord(R.stop, R.stream));
    }
    CHECK(cudaSetDevice(0));
    CHECK(cudaMemcpyAsync(gate, &gate_values[gate_value % 4096], sizeof(uint32_t), cudaMemcpyHostToDevice, opener));
    for (int r = 0; r < 2; ++r) {
      CHECK(cudaSetDevice(r));
      check(cudaStreamSynchronize(rank[r].stream), r ? "GPU 1" : "GPU 0");
      CHECK(cudaEventElapsedTime(&us[r], rank[r].start, rank[r].stop));
      us[r] *= 1e3f;
    }
  };
  // Both launches once on each GPU without the gate: the kernels' first launch loads their
  // module, which must not happen while the other GPU waits at its gate.
  for (int which = 0; which < 2; ++which) {
    for (int r = 0; r < 2; ++r) {
      CHECK(cudaSetDevice(r));
      CHECK(launch_tile_gemm(which ? rank[r].fused : rank[r].alone, rank[r].stream, rank[r].scratch));
    }
    for (int r = 0; r < 2; ++r) {
      CHECK(cudaSetDevice(r));
      CHECK(cudaStreamSynchronize(rank[r].stream));
    }
  }
  std::vector<float> t[2][2];
  for (int round = -3; round < rounds; ++round)
    for (int which = 0; which < 2; ++which) {
      float us[2];
      sample(which, us);
      if (round >= 0)
        for (int r = 0; r < 2; ++r) t[which][r].push_back(us[r]);
    }

  // Check: both GPUs' outputs bitwise equal, and equal to round(P0 + P1).
  const size_t mn = size_t(m) * n;
  std::vector<__nv_bfloat16> out0(mn), out1(mn), p0(mn), p1(mn);
  CHECK(cudaMemcpy(out0.data(), rank[0].out, mn * 2, cudaMemcpyDefault));
  CHECK(cudaMemcpy(out1.data(), rank[1].out, mn * 2, cudaMemcpyDefault));
  CHECK(cudaMemcpy(p0.data(), rank[0].plain, mn * 2, cudaMemcpyDefault));
  CHECK(cudaMemcpy(p1.data(), rank[1].plain, mn * 2, cudaMemcpyDefault));
  size_t differ = 0, wrong = 0;
  for (size_t i = 0; i < mn; ++i) {
    uint16_t a, b;
    std::memcpy(&a, &out0[i], 2);
    std::memcpy(&b, &out1[i], 2);
    differ += a != b;
    const float want = __bfloat162float(__float2bfloat16(__bfloat162float(p0[i]) + __bfloat162float(p1[i])));
    wrong += __bfloat162float(out0[i]) != want;
  }

  std::printf("µs, median of %d interleaved samples (GPU 0 / GPU 1): GEMM alone %.1f / %.1f, fused %.1f / %.1f\n",
              rounds, probe::median(t[0][0]), probe::median(t[0][1]), probe::median(t[1][0]),
              probe::median(t[1][1]));
  std::printf("check: %zu elements differ between the GPUs, %zu differ from round(P0 + P1)\n", differ, wrong);

  // The last fused sample's stamps, from each GPU's earliest kernel-start stamp.
  const char* names[] = {"kernel start", "entered (exchange warps)", "tile MMAs done (last)", "tile published (last)",
                         "warps: pushed (last)", "warps: peer's copy here", "warps: summed", "tail: pushed",
                         "tail: peer's copy here", "tail: summed"};
  const int ctas = rank[0].fused.sm_count;
  for (int r = 0; r < 2; ++r) {
    std::vector<uint64_t> stamps(size_t(ctas) * kExchangeTraceSlots);
    CHECK(cudaMemcpy(stamps.data(), rank[r].ws + layout.total_bytes, stamps.size() * 8, cudaMemcpyDefault));
    uint64_t t0 = UINT64_MAX;
    for (int c = 0; c < ctas; ++c) t0 = std::min(t0, stamps[size_t(c) * kExchangeTraceSlots + kTraceKernelStart]);
    std::printf("GPU %d: step, µs from the kernel start: min / median / max over CTAs (CTAs that took it)\n", r);
    for (int s = 0; s <= kTraceTailSummed; ++s) {
      std::vector<float> v;
      for (int c = 0; c < ctas; ++c) {
        const uint64_t x = stamps[size_t(c) * kExchangeTraceSlots + s];
        if (x >= t0) v.push_back(float(x - t0) * 1e-3f);
      }
      if (v.empty()) continue;
      std::sort(v.begin(), v.end());
      std::printf("  %-26s %8.1f %8.1f %8.1f (%zu)\n", names[s], v.front(), v[v.size() / 2], v.back(), v.size());
    }
  }
  return differ == 0 && wrong == 0 ? 0 : 1;
}
