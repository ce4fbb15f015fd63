// Probe: the W = 2 "pair source" schedule end to end, at launch level, before it is
// built into the library (benchmarks/NOTES.md, "the peer's partial as the epilogue's
// source"). Rank r owns half the rows. It first computes the peer's half and leaves
// the rounded partial P in its own memory. Then, band by band, it computes its own
// rows with the peer's P as the epilogue's source C (read over NVLink), into its sum
// slot S. Copy engines move each finished band: S -> out locally, and the peer's S ->
// out over NVLink. No SM does any communication.
//
//   rank 0 main: [GEMM rows of rank 1 -> P]─sig─wait[band 0 + C][band 1 + C] ... [band B-1 + C]─▶
//   rank 0 CE:                                         └copy S b0  └pull peer b0 ...   └pull b(B-1)
//   rank 1: the same with the halves swapped
//
// Signals, two ways. Stream memory operations (cuStreamWriteValue32 into the peer's
// flag, cuStreamWaitValue32 on one's own, which the waiter then resets to 0 for the
// next call) occupy no SM. One-thread kernels (a release store into the peer's flag;
// a bounded acquire spin on one's own, then the reset) take one SM, which the
// schedule's GEMMs leave free. Both replay from a CUDA graph.
//
// Timed in one process on GPUs 0 and 1 at once (the slower GPU's time), interleaved
// with the plain GEMMs of the whole M: cuBLAS and CUTLASS's 128 x 256 cooperative
// kernel. The bar of the matmul_all_reduce issue at W = 2 is 1.10 x cuBLAS. Each
// schedule's out is checked against the sum of both GPUs' plain GEMMs, eagerly and
// after graph replays.
//
//   C=.venv/lib/python3.11/site-packages/cutlass_library/source
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I$C/include -I$C/tools/util/include benchmarks/micro/pair_source_probe.cu \
//        -o pair_source_probe -lcublas -lcuda
//   ./pair_source_probe M N K band_rows [rounds=20] [memops=0]
//
// Measured (2 x H200): the memops signals cost ~100 µs per call plus ~35 µs per band, so
// they are timed only when asked for. With 8 bands per rank both kinds of signal
// deadlocked (the spin's bound fired; cause not found); up to 4 bands never did.
#include <cublas_v2.h>
#include <cuda.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "cutlass_probe.h"

#define CHECK_CU(x)                                                            \
  do {                                                                         \
    CUresult r_ = (x);                                                         \
    if (r_ != CUDA_SUCCESS) {                                                  \
      const char* msg_ = nullptr;                                              \
      cuGetErrorString(r_, &msg_);                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, msg_);    \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

namespace {

using namespace probe;

__global__ void fill_value(uint16_t* p, int64_t n, uint16_t v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

// Counts the elements where out differs from p0 + p1 by more than bf16 rounding allows.
__global__ void count_mismatches(const Element* out, const Element* p0, const Element* p1, int64_t n,
                                 unsigned long long* bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // out rounds p0's unrounded sum once: off by up to half an ulp of each term.
    const float a = float(p0[i]), b = float(p1[i]);
    if (!(fabsf(float(out[i]) - (a + b)) <= 0.01f * (fabsf(a) + fabsf(b)) + 0.01f)) atomicAdd(bad, 1ull);
  }
}

__global__ void signal_flag(uint32_t* flag) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(flag), "r"(1u) : "memory");
}

// Spins until the peer's signal, bounded (about a second), then resets the flag.
__global__ void wait_flag(uint32_t* flag) {
  uint32_t v = 0;
  for (long long spins = 0; spins < (1ll << 26); ++spins) {
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
    if (v != 0) break;
  }
  if (v == 0) __trap();
  *flag = 0;
}

enum class Sync { kMemops, kKernels, kNone };

struct Gpu {
  int id;
  int rank;
  cudaStream_t main, local_copy, gather;
  cudaEvent_t fork, join_local, join_gather;
  std::vector<cudaEvent_t> band_done;
  cublasHandle_t cublas;
  Element *a, *w;
  Element *partial;  // P: this GPU's partial of the peer's rows
  Element *sums;     // S: the sums of this GPU's own rows
  Element *out;      // [M, N]
  Element *plain;    // the plain GEMM of all rows, for the checks
  uint32_t* flags;   // [0]: peer's phase 1 done; [1 + b]: peer's band b summed
  std::unique_ptr<GemmLaunch<CoopGemm>> coop_plain;
  std::unique_ptr<GemmLaunch<PingpongGemm>> pingpong_plain;
  std::unique_ptr<GemmLaunch<CoopGemm>> phase1_coop;
  std::unique_ptr<GemmLaunch<PingpongGemm>> phase1_pingpong;
  std::vector<std::unique_ptr<GemmLaunch<PingpongGemm>>> bands;
};

struct Plan {
  Shape s;
  int half;       // rows per rank: rank 0 owns [0, half), rank 1 [half, M)
  int band_rows;
  int bands;
  int own_row0(int rank) const { return rank == 0 ? 0 : half; }
  int own_rows(int rank) const { return rank == 0 ? half : s.m - half; }
  int band_rows_of(int rank, int b) const { return std::min(band_rows, own_rows(rank) - b * band_rows); }
  int bands_of(int rank) const { return (own_rows(rank) + band_rows - 1) / band_rows; }
};

void cublas_plain(Gpu& g, const Shape& s) {
  // Row-major out [M, N] = A [M, K] @ W[N, K]^T is column-major out^T [N, M] = W @ A^T.
  const float alpha = 1.f, beta = 0.f;
  CHECK_CUBLAS(cublasGemmEx(g.cublas, CUBLAS_OP_T, CUBLAS_OP_N, s.n, s.m, s.k, &alpha, g.w, CUDA_R_16BF, s.k, g.a,
                            CUDA_R_16BF, s.k, &beta, g.out, CUDA_R_16BF, s.n, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

// Enqueues one call of the schedule on g; `peer` is the other GPU.
// kNone: the GEMM phases and copies alone, without any signal (no check possible).
void signal_peer(Sync sync, uint32_t* peer_flag, cudaStream_t stream) {
  if (sync == Sync::kMemops) {
    CHECK_CU(cuStreamWriteValue32(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUdeviceptr>(peer_flag), 1,
                                  CU_STREAM_WRITE_VALUE_DEFAULT));
  } else if (sync == Sync::kKernels) {
    signal_flag<<<1, 1, 0, stream>>>(peer_flag);
    CHECK(cudaGetLastError());
  }
}

void wait_own(Sync sync, uint32_t* flag, cudaStream_t stream) {
  if (sync == Sync::kMemops) {
    const CUstream st = reinterpret_cast<CUstream>(stream);
    CHECK_CU(cuStreamWaitValue32(st, reinterpret_cast<CUdeviceptr>(flag), 1, CU_STREAM_WAIT_VALUE_GEQ));
    CHECK_CU(cuStreamWriteValue32(st, reinterpret_cast<CUdeviceptr>(flag), 0, CU_STREAM_WRITE_VALUE_DEFAULT));
  } else if (sync == Sync::kKernels) {
    wait_flag<<<1, 1, 0, stream>>>(flag);
    CHECK(cudaGetLastError());
  }
}

void enqueue_pair_source(Gpu& g, Gpu& peer, const Plan& p, bool pingpong_phase1, Sync sync) {
  const Shape& s = p.s;
  CHECK(cudaSetDevice(g.id));
  // Phase 1: the peer's rows into P.
  if (pingpong_phase1) g.phase1_pingpong->run(g.main);
  else g.phase1_coop->run(g.main);
  signal_peer(sync, peer.flags + 0, g.main);
  wait_own(sync, g.flags + 0, g.main);
  CHECK(cudaEventRecord(g.fork, g.main));
  CHECK(cudaStreamWaitEvent(g.local_copy, g.fork, 0));
  CHECK(cudaStreamWaitEvent(g.gather, g.fork, 0));
  const size_t row_bytes = size_t(s.n) * sizeof(Element);
  const int own0 = p.own_row0(g.rank), peer0 = p.own_row0(peer.rank);
  for (int b = 0; b < p.bands_of(g.rank); ++b) {
    g.bands[b]->run(g.main);
    signal_peer(sync, peer.flags + 1 + b, g.main);
    CHECK(cudaEventRecord(g.band_done[b], g.main));
    CHECK(cudaStreamWaitEvent(g.local_copy, g.band_done[b], 0));
    const size_t rows = size_t(p.band_rows_of(g.rank, b));
    CHECK(cudaMemcpyAsync(reinterpret_cast<char*>(g.out) + (own0 + size_t(b) * p.band_rows) * row_bytes,
                          reinterpret_cast<char*>(g.sums) + size_t(b) * p.band_rows * row_bytes, rows * row_bytes,
                          cudaMemcpyDeviceToDevice, g.local_copy));
  }
  for (int b = 0; b < p.bands_of(peer.rank); ++b) {
    wait_own(sync, g.flags + 1 + b, g.gather);
    const size_t rows = size_t(p.band_rows_of(peer.rank, b));
    CHECK(cudaMemcpyAsync(reinterpret_cast<char*>(g.out) + (peer0 + size_t(b) * p.band_rows) * row_bytes,
                          reinterpret_cast<char*>(peer.sums) + size_t(b) * p.band_rows * row_bytes, rows * row_bytes,
                          cudaMemcpyDefault, g.gather));
  }
  CHECK(cudaEventRecord(g.join_local, g.local_copy));
  CHECK(cudaEventRecord(g.join_gather, g.gather));
  CHECK(cudaStreamWaitEvent(g.main, g.join_local, 0));
  CHECK(cudaStreamWaitEvent(g.main, g.join_gather, 0));
}

struct Case {
  std::string name;
  int kind;  // 0 cuBLAS, 1 coop plain, 2 pingpong plain, 3 the schedule eagerly, 4 its graph
  Sync sync;
  bool pingpong_phase1;
  std::vector<float> us;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s M N K band_rows [rounds]\n", argv[0]);
    return 2;
  }
  Plan p{};
  p.s = {std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3])};
  p.band_rows = std::atoi(argv[4]);
  const int rounds = argc > 5 ? std::atoi(argv[5]) : 20;
  const bool with_memops = argc > 6 && std::atoi(argv[6]) != 0;
  const Shape& s = p.s;
  p.half = (s.m / 2 + 127) / 128 * 128;  // whole 128-row tiles on rank 0
  CHECK_CU(cuInit(0));
  enable_peer_pair();
  std::vector<Gpu> gpus(2);
  const size_t mk = size_t(s.m) * s.k, nk = size_t(s.n) * s.k, mn = size_t(s.m) * s.n;
  const int max_bands = (std::max(p.own_rows(0), p.own_rows(1)) + p.band_rows - 1) / p.band_rows;
  for (int i = 0; i < 2; ++i) {
    Gpu& g = gpus[i];
    g.id = i;
    g.rank = i;
    CHECK(cudaSetDevice(i));
    for (cudaStream_t* st : {&g.main, &g.local_copy, &g.gather}) CHECK(cudaStreamCreateWithFlags(st, cudaStreamNonBlocking));
    for (cudaEvent_t* e : {&g.fork, &g.join_local, &g.join_gather})
      CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    g.band_done.resize(max_bands);
    for (cudaEvent_t& e : g.band_done) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CHECK_CUBLAS(cublasCreate(&g.cublas));
    CHECK_CUBLAS(cublasSetStream(g.cublas, g.main));
    CHECK(cudaMalloc(&g.a, mk * sizeof(Element)));
    CHECK(cudaMalloc(&g.w, nk * sizeof(Element)));
    CHECK(cudaMalloc(&g.partial, mn * sizeof(Element)));
    CHECK(cudaMalloc(&g.sums, mn * sizeof(Element)));
    CHECK(cudaMalloc(&g.out, mn * sizeof(Element)));
    CHECK(cudaMalloc(&g.plain, mn * sizeof(Element)));
    CHECK(cudaMalloc(&g.flags, (1 + max_bands) * sizeof(uint32_t)));
    CHECK(cudaMemset(g.flags, 0, (1 + max_bands) * sizeof(uint32_t)));
    fill_random(g.a, mk, 11u + i);
    fill_random(g.w, nk, 23u + i);
    CHECK(cudaDeviceSynchronize());
  }
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (int i = 0; i < 2; ++i) {
    Gpu& g = gpus[i];
    Gpu& peer = gpus[1 - i];
    g.coop_plain = std::make_unique<GemmLaunch<CoopGemm>>(g.id, g.main, s, g.a, g.w, 0, s.m, 0.f, g.out, g.out);
    g.pingpong_plain = std::make_unique<GemmLaunch<PingpongGemm>>(g.id, g.main, s, g.a, g.w, 0, s.m, 0.f, g.out, g.out);
    const int peer0 = p.own_row0(peer.rank), peer_rows = p.own_rows(peer.rank);
    // The schedule's GEMMs leave one SM to the spinning waits.
    g.phase1_coop = std::make_unique<GemmLaunch<CoopGemm>>(g.id, g.main, s, g.a, g.w, peer0, peer_rows, 0.f, g.partial,
                                                       g.partial, sms - 1);
    g.phase1_pingpong = std::make_unique<GemmLaunch<PingpongGemm>>(g.id, g.main, s, g.a, g.w, peer0, peer_rows, 0.f,
                                                               g.partial, g.partial, sms - 1);
    const int own0 = p.own_row0(g.rank);
    for (int b = 0; b < p.bands_of(g.rank); ++b) {
      const size_t off = size_t(b) * p.band_rows * s.n;
      // C: the peer's partial of these rows (the peer's P holds this GPU's rows from its row 0).
      g.bands.push_back(std::make_unique<GemmLaunch<PingpongGemm>>(g.id, g.main, s, g.a, g.w, own0 + b * p.band_rows,
                                                               p.band_rows_of(g.rank, b), 1.f, peer.partial + off,
                                                               g.sums + off, sms - 1));
    }
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s x 2, M = %d, N = %d, K = %d, bands of %d rows (%d on rank 0); µs per call: median over %d "
              "interleaved rounds of the slower GPU\n",
              prop.name, s.m, s.n, s.k, p.band_rows, p.bands_of(0), rounds);

  // The reference: each GPU's plain GEMM (coop) of all rows.
  for (Gpu& g : gpus) {
    CHECK(cudaSetDevice(g.id));
    g.coop_plain->run(g.main);
    CHECK(cudaMemcpyAsync(g.plain, g.out, mn * sizeof(Element), cudaMemcpyDeviceToDevice, g.main));
    CHECK(cudaStreamSynchronize(g.main));
  }
  auto check_out = [&](const char* what) {
    unsigned long long total = 0;
    for (Gpu& g : gpus) {
      CHECK(cudaSetDevice(g.id));
      CHECK(cudaDeviceSynchronize());
      unsigned long long* counter = nullptr;
      CHECK(cudaMalloc(&counter, sizeof(*counter)));
      CHECK(cudaMemset(counter, 0, sizeof(*counter)));
      count_mismatches<<<1024, 256>>>(g.out, gpus[0].plain, gpus[1].plain, int64_t(mn), counter);
      CHECK(cudaGetLastError());
      unsigned long long bad = 0;
      CHECK(cudaMemcpy(&bad, counter, sizeof(bad), cudaMemcpyDeviceToHost));
      CHECK(cudaFree(counter));
      total += bad;
    }
    if (total == 0) std::printf("  check %-34s out = P0 + P1: ok\n", what);
    else std::printf("  check %-34s WRONG: %llu of %zu elements\n", what, total, 2 * mn);
    return total == 0;
  };
  auto poison = [&] {
    for (Gpu& g : gpus) {
      CHECK(cudaSetDevice(g.id));
      fill_value<<<1024, 256>>>(reinterpret_cast<uint16_t*>(g.out), int64_t(mn), 0x7fc0);  // NaN
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
    }
  };

  // Graphs of one call of the schedule per GPU (coop phase 1), one per signal kind.
  const std::vector<Sync> syncs = with_memops ? std::vector<Sync>{Sync::kKernels, Sync::kMemops}
                                              : std::vector<Sync>{Sync::kKernels};
  cudaGraphExec_t graphs[2][2];
  for (size_t k = 0; k < syncs.size(); ++k) {
    for (int i = 0; i < 2; ++i) {
      Gpu& g = gpus[i];
      CHECK(cudaSetDevice(g.id));
      cudaGraph_t graph;
      CHECK(cudaStreamBeginCapture(g.main, cudaStreamCaptureModeThreadLocal));
      enqueue_pair_source(g, gpus[1 - i], p, false, syncs[k]);
      CHECK(cudaStreamEndCapture(g.main, &graph));
      CHECK(cudaGraphInstantiate(&graphs[k][i], graph, 0));
      CHECK(cudaGraphDestroy(graph));
    }
  }
  auto sync_name = [](Sync s) { return s == Sync::kMemops ? "memops" : s == Sync::kKernels ? "kernels" : "none"; };

  bool ok = true;
  for (size_t k = 0; k < syncs.size(); ++k) {
    for (bool pingpong : {false, true}) {
      poison();
      for (int i = 0; i < 2; ++i) enqueue_pair_source(gpus[i], gpus[1 - i], p, pingpong, syncs[k]);
      ok &= check_out((std::string("eager, ") + sync_name(syncs[k]) + (pingpong ? ", pingpong" : ", coop") +
                       " phase 1").c_str());
    }
    for (int replay = 0; replay < 3; ++replay) {
      poison();
      for (int i = 0; i < 2; ++i) {
        CHECK(cudaSetDevice(gpus[i].id));
        CHECK(cudaGraphLaunch(graphs[k][i], gpus[i].main));
      }
      ok &= check_out((std::string("graph, ") + sync_name(syncs[k]) + ", replay " + std::to_string(replay)).c_str());
    }
  }

  std::vector<Case> cases = {{"cuBLAS plain (all rows)", 0, Sync::kNone, false, {}},
                             {"coop plain (all rows)", 1, Sync::kNone, false, {}},
                             {"pingpong plain (all rows)", 2, Sync::kNone, false, {}},
                             {"phases + copies, no signals", 3, Sync::kNone, false, {}},
                             {"schedule, kernels", 3, Sync::kKernels, false, {}},
                             {"schedule, kernels, pingpong ph. 1", 3, Sync::kKernels, true, {}},
                             {"schedule, kernels, graph", 4, Sync::kKernels, false, {}}};
  if (with_memops) {
    cases.push_back({"schedule, memops", 3, Sync::kMemops, false, {}});
    cases.push_back({"schedule, memops, graph", 4, Sync::kMemops, false, {}});
  }
  for (int round = -2; round < rounds; ++round) {
    for (size_t j = 0; j < cases.size(); ++j) {
      Case& c = cases[(j + size_t(round + 2)) % cases.size()];
      cudaEvent_t start[2], stop[2];
      for (int i = 0; i < 2; ++i) {
        Gpu& g = gpus[i];
        CHECK(cudaSetDevice(g.id));
        CHECK(cudaEventCreate(&start[i]));
        CHECK(cudaEventCreate(&stop[i]));
        CHECK(cudaEventRecord(start[i], g.main));
        switch (c.kind) {
          case 0: cublas_plain(g, s); break;
          case 1: g.coop_plain->run(g.main); break;
          case 2: g.pingpong_plain->run(g.main); break;
          case 3: enqueue_pair_source(g, gpus[1 - i], p, c.pingpong_phase1, c.sync); break;
          default: CHECK(cudaGraphLaunch(graphs[c.sync == Sync::kKernels ? 0 : 1][i], g.main)); break;
        }
        CHECK(cudaEventRecord(stop[i], g.main));
      }
      float slowest = 0.f;
      for (int i = 0; i < 2; ++i) {
        CHECK(cudaSetDevice(gpus[i].id));
        CHECK(cudaEventSynchronize(stop[i]));
        float ms = 0.f;
        CHECK(cudaEventElapsedTime(&ms, start[i], stop[i]));
        slowest = std::max(slowest, ms * 1000.f);
        CHECK(cudaEventDestroy(start[i]));
        CHECK(cudaEventDestroy(stop[i]));
      }
      if (round >= 0) c.us.push_back(slowest);
    }
  }
  float cublas_us = 0.f;
  for (Case& c : cases) {
    std::sort(c.us.begin(), c.us.end());
    const float med = c.us[c.us.size() / 2];
    if (c.kind == 0) cublas_us = med;
    std::printf("%-36s %9.1f  (min %.1f, max %.1f)  %.3fx cuBLAS\n", c.name.c_str(), med, c.us.front(), c.us.back(),
                med / cublas_us);
  }
  return ok ? 0 : 1;
}
