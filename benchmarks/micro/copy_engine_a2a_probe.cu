// Can the copy engines add NVLink bytes to what SMs move, and keep their rate beside a
// running GEMM? Design data for the all-reduce-bound band rows (W = 4 o_proj), where
// every SM-issued schedule measured stays at ~225-276 GB/s while the GEMM runs.
//
// One process, every visible GPU, the band all-reduce's pattern: each GPU sends the
// same bytes to every peer and receives as many from each. Phases (GB/s per GPU and
// direction; the slowest GPU counts):
//   ce 1 stream    copy engine, the W - 1 pushes of a band back to back on one stream
//   ce W-1 streams copy engine, one stream per peer
//   sm push / pull the SM all-to-all on R CTAs (stores to, or loads from, the peers)
//   sm | ce        both at once on separate buffers: the SMs' rate while copies run, the
//                  copies' rate while the SMs run ("other"), and their sum
//   gemm           cuBLAS bf16 GEMM [M, K] x [K, N] alone, µs per call (random operands)
//   ce | gemm      the copy engine's rate while the GEMM loop runs on every SM
//   gemm | ce      the GEMM's µs per call while the copy-engine loop runs
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/micro/copy_engine_a2a_probe.cu -lcublas -o copy_engine_a2a_probe
//   ./copy_engine_a2a_probe [copy MB = 4] [copies per peer and round = 8] [M N K = 8192 8192 2048]
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "probe_check.h"

namespace {

using probe::kMaxGpus;

struct Gpu {
  char* ce_send;  // (W - 1) x round bytes, one slot per peer
  char* ce_recv;  // (W - 1) x round bytes, one slot per sender
  char* sm_send;
  char* sm_recv;
  __nv_bfloat16 *a, *b, *c;
  cublasHandle_t blas;
  cudaStream_t gemm, ce[kMaxGpus], sm;
  cudaEvent_t start, first, end[kMaxGpus];
};

int gpus = 0;
std::vector<Gpu> g;
size_t copy_bytes = 4ull << 20;
int copies = 8;  // per peer and round
int gm = 8192, gn = 8192, gk = 2048;

size_t round_bytes() { return copy_bytes * copies; }  // per peer
int slot(int from, int to) { return (to - from + gpus) % gpus - 1; }

// One round of copy-engine pushes on GPU d: `copies` copies to every peer, on one
// stream (interleaved by peer, as bands come out) or on a stream per peer.
void enqueue_ce_round(int d, bool per_peer) {
  for (int c = 0; c < copies; ++c)
    for (int k = 0; k < gpus - 1; ++k) {
      const int h = (d + 1 + k) % gpus;
      const size_t off = size_t(c) * copy_bytes;
      char* dst = g[h].ce_recv + slot(h, d) * round_bytes() + off;
      const char* src = g[d].ce_send + slot(d, h) * round_bytes() + off;
      CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, g[d].ce[per_peer ? k : 0]));
    }
}

// One round of SM all-to-all on GPU d: every peer's `round_bytes` by stores (push) or
// loads (pull), eight 16-byte words in flight per thread.
void enqueue_sm_round(int d, bool pull, int ctas) {
  probe::AllToAll p{};
  p.pieces = gpus - 1;
  p.vectors = (long long)(round_bytes() / 16);
  for (int k = 0; k < gpus - 1; ++k) {
    const int h = (d + 1 + k) % gpus;
    const int src_owner = pull ? h : d, src_to = pull ? d : h;
    const int dst_owner = pull ? d : h, dst_from = pull ? h : d;
    p.src[k] = reinterpret_cast<const uint4*>(g[src_owner].sm_send + slot(src_owner, src_to) * round_bytes());
    p.dst[k] = reinterpret_cast<uint4*>(g[dst_owner].sm_recv + slot(dst_owner, dst_from) * round_bytes());
  }
  probe::all_to_all_kernel<8><<<ctas, 512, 0, g[d].sm>>>(p);
  CHECK(cudaGetLastError());
}

void enqueue_gemm(int d) {
  const float one = 1.f, zero = 0.f;
  // Row-major C[M, N] = A[M, K] B[K, N] is column-major C^T = B^T A^T.
  CHECK_CUBLAS(cublasGemmEx(g[d].blas, CUBLAS_OP_N, CUBLAS_OP_N, gn, gm, gk, &one, g[d].b, CUDA_R_16BF, gn, g[d].a,
                            CUDA_R_16BF, gk, &zero, g[d].c, CUDA_R_16BF, gn, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

// Every GPU's streams start together: their first work waits behind a gate kernel
// that spins on a host flag, opened once every GPU's work is enqueued (enqueueing one
// GPU's copies takes milliseconds). Bounded: the gate opens by itself after 10 s.
volatile int* gate = nullptr;
__global__ void gate_kernel(const volatile int* flag) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (*flag == 0 && t - t0 < 10000000000ull);
}

// A phase: on every GPU, `foreground` on `fg_streams`, timed. With a background, its
// `bg_unit` starts first, `bg_count` times on `bg_streams`, and the foreground waits for
// the first unit, so that it runs beside the background's steady state. Returns the
// foreground's ms (its start to its last stream's end, slowest GPU).
using Enqueue = std::function<void(int d)>;
float run_phase(const Enqueue& foreground, const std::vector<int>& fg_streams, const Enqueue& bg_unit = {},
                int bg_count = 0, const std::vector<int>& bg_streams = {}) {
  // Stream ids: 0 gemm, 1 sm, 2 + k the copy-engine stream k.
  auto stream = [](int d, int id) { return id == 0 ? g[d].gemm : id == 1 ? g[d].sm : g[d].ce[id - 2]; };
  *gate = 0;
  for (int d = 0; d < gpus; ++d) {
    CHECK(cudaSetDevice(d));
    cudaStream_t lead = stream(d, bg_unit ? bg_streams[0] : fg_streams[0]);
    gate_kernel<<<1, 1, 0, lead>>>(gate);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(g[d].start, lead));
    for (int id : bg_streams) CHECK(cudaStreamWaitEvent(stream(d, id), g[d].start));
    for (int id : fg_streams) CHECK(cudaStreamWaitEvent(stream(d, id), g[d].start));
    if (bg_unit) {
      bg_unit(d);
      CHECK(cudaEventRecord(g[d].first, stream(d, bg_streams[0])));
      for (int id : fg_streams) CHECK(cudaStreamWaitEvent(stream(d, id), g[d].first));
      CHECK(cudaEventRecord(g[d].start, stream(d, fg_streams[0])));  // the foreground's start
    }
    foreground(d);
    for (size_t i = 0; i < fg_streams.size(); ++i) CHECK(cudaEventRecord(g[d].end[i], stream(d, fg_streams[i])));
    for (int i = 1; i < bg_count; ++i) bg_unit(d);
  }
  const auto opened = std::chrono::steady_clock::now();
  *gate = 1;
  float worst = 0;
  for (int d = 0; d < gpus; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaDeviceSynchronize());
    for (size_t i = 0; i < fg_streams.size(); ++i) {
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, g[d].start, g[d].end[i]));
      worst = std::max(worst, ms);
    }
  }
  if (std::chrono::steady_clock::now() - opened > std::chrono::seconds(5))
    std::fprintf(stderr, "a phase ran for more than 5 s: the gate may have timed out\n");
  return worst;
}

// The median of three runs of a phase.
template <typename F>
float median3(F phase) {
  std::vector<float> t{phase(), phase(), phase()};
  return probe::median(t);
}

double gbs(double bytes, float ms) { return bytes / (ms * 1e-3) / 1e9; }

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) copy_bytes = std::strtoull(argv[1], nullptr, 10) << 20;
  if (argc > 2) copies = std::atoi(argv[2]);
  if (argc > 5) {
    gm = std::atoi(argv[3]);
    gn = std::atoi(argv[4]);
    gk = std::atoi(argv[5]);
  }
  CHECK(cudaGetDeviceCount(&gpus));
  if (gpus < 2) {
    std::printf("needs 2 GPUs, found %d\n", gpus);
    return 1;
  }
  gpus = std::min(gpus, kMaxGpus);
  g.resize(gpus);
  const size_t slots = round_bytes() * (gpus - 1);
  probe::enable_peer_access(gpus);
  for (int d = 0; d < gpus; ++d) {
    CHECK(cudaSetDevice(d));
    Gpu& x = g[d];
    for (char** p : {&x.ce_send, &x.ce_recv, &x.sm_send, &x.sm_recv}) CHECK(cudaMalloc(p, slots));
    CHECK(cudaMalloc(&x.a, size_t(gm) * gk * 2));
    CHECK(cudaMalloc(&x.b, size_t(gk) * gn * 2));
    CHECK(cudaMalloc(&x.c, size_t(gm) * gn * 2));
    probe::fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(x.ce_send), int64_t(slots / 2), 11u + d);
    probe::fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(x.sm_send), int64_t(slots / 2), 21u + d);
    probe::fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(x.a), int64_t(gm) * gk, 31u + d);
    probe::fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(x.b), int64_t(gk) * gn, 41u + d);
    CHECK(cudaGetLastError());
    CHECK(cudaStreamCreateWithFlags(&x.gemm, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&x.sm, cudaStreamNonBlocking));
    for (int k = 0; k < gpus - 1; ++k) CHECK(cudaStreamCreateWithFlags(&x.ce[k], cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&x.start));
    CHECK(cudaEventCreate(&x.first));
    for (cudaEvent_t& e : x.end) CHECK(cudaEventCreate(&e));
    CHECK_CUBLAS(cublasCreate(&x.blas));
    CHECK_CUBLAS(cublasSetStream(x.blas, x.gemm));
    CHECK(cudaDeviceSynchronize());
  }
  CHECK(cudaHostAlloc((void**)&gate, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const double round = double(round_bytes()) * (gpus - 1);  // bytes each GPU sends per round
  std::printf("%s x %d; a round: %d copies of %zu KB to each of %d peers (%.0f MB sent per GPU); GEMM %d x %d x %d\n",
              prop.name, gpus, copies, copy_bytes >> 10, gpus - 1, round / 1e6, gm, gn, gk);
  std::printf("%-36s %12s %12s %12s\n", "phase", "GB/s", "other GB/s", "sum or us");

  const std::vector<int> ce1{2}, sm{1}, gemm{0};
  std::vector<int> ce_all;
  for (int k = 0; k < gpus - 1; ++k) ce_all.push_back(2 + k);
  const int rounds = 6;  // few enough copies that the queues never fill behind the gate
  auto repeat = [](int n, Enqueue f) { return Enqueue([=](int d) { for (int i = 0; i < n; ++i) f(d); }); };
  for (int pass = 0; pass < 2; ++pass) {  // pass 0 warms up, untimed
    const bool show = pass == 1;
    auto line = [&](const char* name, double a, double b, double c) {
      if (show) std::printf("%-36s %12.1f %12.1f %12.1f\n", name, a, b, c);
    };
    // Copy engine alone.
    for (bool per_peer : {false, true}) {
      const Enqueue ce = [=](int d) { enqueue_ce_round(d, per_peer); };
      const float ms = median3([&] { return run_phase(repeat(rounds, ce), per_peer ? ce_all : ce1); });
      line(per_peer ? "ce, a stream per peer" : "ce, one stream", gbs(round * rounds, ms), 0, 0);
    }
    // SM all-to-all alone and beside the copy engine.
    for (bool pull : {false, true}) {
      for (int ctas : {16, 32, 132}) {
        const Enqueue s = [=](int d) { enqueue_sm_round(d, pull, ctas); };
        const float ms = median3([&] { return run_phase(repeat(rounds, s), sm); });
        char name[64];
        std::snprintf(name, sizeof name, "sm %s, %d CTAs", pull ? "pull" : "push", ctas);
        line(name, gbs(round * rounds, ms), 0, 0);
        if (ctas == 132) continue;
        // Both at once: each side timed while a longer loop of the other covers it.
        const Enqueue ce = [](int d) { enqueue_ce_round(d, false); };
        const float sm_ms = median3([&] { return run_phase(repeat(rounds, s), sm, ce, 2 * rounds + 1, ce1); });
        const float ce_ms = median3([&] { return run_phase(repeat(rounds, ce), ce1, s, 3 * rounds + 1, sm); });
        std::snprintf(name, sizeof name, "sm %s %d CTAs | ce one stream", pull ? "pull" : "push", ctas);
        const double sm_rate = gbs(round * rounds, sm_ms), ce_rate = gbs(round * rounds, ce_ms);
        line(name, sm_rate, ce_rate, sm_rate + ce_rate);
      }
    }
    // The GEMM alone, the copy engine beside it, and it beside the copy engine.
    const Enqueue gem = enqueue_gemm;
    const int calls = 6;
    const float alone = median3([&] { return run_phase(repeat(calls, gem), gemm); });
    line("gemm alone (us per call)", 0, 0, alone * 1e3 / calls);
    for (bool per_peer : {false, true}) {
      const Enqueue ce = [=](int d) { enqueue_ce_round(d, per_peer); };
      const std::vector<int>& streams = per_peer ? ce_all : ce1;
      // The copies beside a GEMM loop long enough to cover them.
      const float ce_ms = median3([&] { return run_phase(repeat(rounds, ce), streams, gem, 4 * calls + 1, gemm); });
      line(per_peer ? "ce per peer | gemm" : "ce one stream | gemm", gbs(round * rounds, ce_ms), 0, 0);
      // The GEMMs beside a copy loop long enough to cover them.
      const float gemm_ms = median3([&] { return run_phase(repeat(calls, gem), gemm, ce, 2 * rounds + 1, streams); });
      line(per_peer ? "gemm | ce per peer (us per call)" : "gemm | ce one stream (us per call)", 0, 0,
           gemm_ms * 1e3 / calls);
    }
  }
  return 0;
}
