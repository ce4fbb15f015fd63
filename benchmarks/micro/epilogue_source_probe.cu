// Probe: what does a Hopper GEMM lose when its epilogue reads a source tile C from
// the peer GPU's memory, and when copy-engine traffic runs beside it? Design data for
// the W = 2 schedule in which rank r's epilogue adds the peer's partial of each of its
// own tiles (benchmarks/NOTES.md, "the peer's partial as the epilogue's source").
//
// One process, GPU 0 and GPU 1 with peer access, the same GEMM on both at once (so
// every NVLink carries the traffic both ways, as in the schedule):
//
//   D[M, N] = A[M, K] @ W[N, K]^T (+ C)      bf16, fp32 accumulation, persistent kernels:
//     coop      128 x 256 x 64 tiles, both consumer warp groups on one tile (the
//               tile GEMM's prefill shape); the tile's epilogue stalls its MMAs
//     pingpong  128 x 128 x 64 tiles, one warp group per tile, so one group's
//               epilogue runs under the other's MMAs
//
//   plain        beta = 0: no C is read
//   C peer       beta = 1, C on the other GPU (TMA loads over NVLink)
//   plain + CE   beta = 0, and a side stream copies half of D's bytes per GEMM
//                from the other GPU (cudaMemcpyPeerAsync), as the gather would
//   halves ...   the same rows as two launches, [0, M/2) plain, then [M/2, M) as
//                named: the schedule's two phases (only the own half reads C)
//
// The cases run interleaved, one of each per round in a rotating order, so that a
// drift of the clocks over the run (seen: +19 % on 2 x H200 when the cases ran one
// after another) reaches every case alike. Then each case runs once more alone and
// its D is checked against the plain D plus the peer's C.
//
//   C=.venv/lib/python3.11/site-packages/cutlass_library/source
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I$C/include -I$C/tools/util/include benchmarks/micro/epilogue_source_probe.cu \
//        -o epilogue_source_probe
//   ./epilogue_source_probe [M=8192] [N=8192] [K=4096] [rounds=30]
#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cutlass_probe.h"

namespace {

using namespace probe;

// Counts the elements where d differs from plain + c by more than bf16 rounding allows.
__global__ void count_mismatches(const Element* d, const Element* plain, const Element* c, int64_t n,
                                 unsigned long long* bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float want = float(plain[i]) + float(c[i]);
    const float got = float(d[i]);
    if (!(fabsf(got - want) <= 0.02f * fabsf(want) + 0.05f)) atomicAdd(bad, 1ull);
  }
}

struct Buffers {
  int id;
  cudaStream_t stream, copy_stream;
  Element *a, *w, *c, *d, *gather;  // gather: where the copy engine lands the peer's bytes
  Element* plain;                    // D of the plain GEMM, for the check of the C cases
};

// One GEMM launch over rows [row0, row0 + rows) of A and D on one GPU, of either kernel.
struct Launch {
  virtual ~Launch() = default;
  virtual void run(cudaStream_t stream) = 0;
};

template <class Gemm>
struct LaunchOf : Launch {
  GemmLaunch<Gemm> gemm;
  LaunchOf(const Buffers& dev, const Shape& s, int row0, int rows, float beta, const Element* c)
      : gemm(dev.id, dev.stream, s, dev.a, dev.w, row0, rows, beta, c + size_t(row0) * s.n,
             dev.d + size_t(row0) * s.n) {}
  void run(cudaStream_t stream) override { gemm.run(stream); }
};

enum class Kind { kCoop, kPingpong };

struct Case {
  std::string name;
  Kind kind;
  bool peer_c;   // the last launch reads the other GPU's C with beta = 1
  bool copies;   // the gather's copy-engine traffic beside the GEMM
  bool halves;   // rows [0, M/2) plain, then rows [M/2, M): the schedule's two phases
  std::vector<std::unique_ptr<Launch>> launches[2];  // per GPU, run back to back
  std::vector<float> us;                              // per round, the slower GPU's
};

std::unique_ptr<Launch> make_launch(Kind kind, const Buffers& dev, const Shape& s, int row0, int rows, float beta,
                                    const Element* c) {
  if (kind == Kind::kCoop) return std::make_unique<LaunchOf<CoopGemm>>(dev, s, row0, rows, beta, c);
  return std::make_unique<LaunchOf<PingpongGemm>>(dev, s, row0, rows, beta, c);
}

// Runs `c` once on both GPUs at once; returns the slower GPU's time (µs). With
// copies, each GPU's copy stream pulls `copy_bytes` from the other GPU in 4 pieces
// while its GEMMs run.
float run_both(std::vector<Buffers>& devs, Case& c, size_t copy_bytes) {
  cudaEvent_t start[2], stop[2];
  for (int i = 0; i < 2; ++i) {
    Buffers& d = devs[i];
    const Buffers& peer = devs[1 - i];
    CHECK(cudaSetDevice(d.id));
    CHECK(cudaEventCreate(&start[i]));
    CHECK(cudaEventCreate(&stop[i]));
    CHECK(cudaEventRecord(start[i], d.stream));
    if (c.copies) {
      CHECK(cudaStreamWaitEvent(d.copy_stream, start[i]));
      for (int piece = 0; piece < 4; ++piece)
        CHECK(cudaMemcpyPeerAsync(reinterpret_cast<char*>(d.gather) + piece * (copy_bytes / 4), d.id,
                                  reinterpret_cast<const char*>(peer.d) + piece * (copy_bytes / 4), peer.id,
                                  copy_bytes / 4, d.copy_stream));
    }
    for (auto& l : c.launches[i]) l->run(d.stream);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(stop[i], d.stream));
  }
  float slowest = 0.f;
  for (int i = 0; i < 2; ++i) {
    CHECK(cudaSetDevice(devs[i].id));
    CHECK(cudaEventSynchronize(stop[i]));
    CHECK(cudaStreamSynchronize(devs[i].copy_stream));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, start[i], stop[i]));
    slowest = std::max(slowest, ms * 1000.f);
    CHECK(cudaEventDestroy(start[i]));
    CHECK(cudaEventDestroy(stop[i]));
  }
  return slowest;
}

}  // namespace

int main(int argc, char** argv) {
  const Shape s{argc > 1 ? std::atoi(argv[1]) : 8192, argc > 2 ? std::atoi(argv[2]) : 8192,
                argc > 3 ? std::atoi(argv[3]) : 4096};
  const int rounds = argc > 4 ? std::atoi(argv[4]) : 30;
  enable_peer_pair();
  std::vector<Buffers> devs(2);
  const size_t mk = size_t(s.m) * s.k, nk = size_t(s.n) * s.k, mn = size_t(s.m) * s.n;
  for (int i = 0; i < 2; ++i) {
    Buffers& d = devs[i];
    d.id = i;
    CHECK(cudaSetDevice(i));
    CHECK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&d.copy_stream, cudaStreamNonBlocking));
    CHECK(cudaMalloc(&d.a, mk * sizeof(Element)));
    CHECK(cudaMalloc(&d.w, nk * sizeof(Element)));
    CHECK(cudaMalloc(&d.c, mn * sizeof(Element)));
    CHECK(cudaMalloc(&d.d, mn * sizeof(Element)));
    CHECK(cudaMalloc(&d.gather, mn * sizeof(Element)));
    CHECK(cudaMalloc(&d.plain, mn * sizeof(Element)));
    fill_random(d.a, mk, 11u + i);
    fill_random(d.w, nk, 23u + i);
    fill_random(d.c, mn, 37u + i);
    CHECK(cudaDeviceSynchronize());
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s x 2, M = %d, N = %d, K = %d, µs per GEMM: median over %d interleaved rounds of the slower GPU\n",
              prop.name, s.m, s.n, s.k, rounds);

  std::vector<Case> cases;
  for (Kind kind : {Kind::kCoop, Kind::kPingpong}) {
    const std::string k = kind == Kind::kCoop ? "coop " : "pingpong ";
    for (const auto& [name, peer_c, copies, halves] :
         std::vector<std::tuple<const char*, bool, bool, bool>>{{"plain", false, false, false},
                                                                {"plain + CE", false, true, false},
                                                                {"C peer", true, false, false},
                                                                {"halves", false, false, true},
                                                                {"halves, C peer", true, false, true},
                                                                {"halves, C peer + CE", true, true, true}}) {
      Case c{k + name, kind, peer_c, copies, halves, {}, {}};
      for (int i = 0; i < 2; ++i) {
        const Element* source = peer_c ? devs[1 - i].c : devs[i].c;
        const float beta = peer_c ? 1.f : 0.f;
        if (halves) {
          c.launches[i].push_back(make_launch(kind, devs[i], s, 0, s.m / 2, 0.f, devs[i].c));
          c.launches[i].push_back(make_launch(kind, devs[i], s, s.m / 2, s.m - s.m / 2, beta, source));
        } else {
          c.launches[i].push_back(make_launch(kind, devs[i], s, 0, s.m, beta, source));
        }
      }
      cases.push_back(std::move(c));
    }
  }

  const size_t half_output = mn * sizeof(Element) / 2;  // what each rank gathers per call
  for (int round = -2; round < rounds; ++round) {
    for (size_t j = 0; j < cases.size(); ++j) {
      Case& c = cases[(j + size_t(round + 2)) % cases.size()];
      const float us = run_both(devs, c, half_output);
      if (round >= 0) c.us.push_back(us);
    }
  }

  // Checks: the plain coop D is the reference; every C-peer case must be it plus the peer's C.
  bool all_right = true;
  for (Case& c : cases) {
    run_both(devs, c, half_output);
    unsigned long long bad = 0;
    if (c.name == "coop plain") {
      for (Buffers& d : devs) {
        CHECK(cudaSetDevice(d.id));
        CHECK(cudaMemcpy(d.plain, d.d, mn * sizeof(Element), cudaMemcpyDeviceToDevice));
      }
    } else if (c.peer_c) {
      const int64_t checked_from = c.halves ? int64_t(s.m / 2) * s.n : 0;
      for (int i = 0; i < 2; ++i) {
        Buffers& d = devs[i];
        CHECK(cudaSetDevice(d.id));
        unsigned long long* counter = nullptr;
        CHECK(cudaMalloc(&counter, sizeof(*counter)));
        CHECK(cudaMemset(counter, 0, sizeof(*counter)));
        count_mismatches<<<1024, 256>>>(d.d + checked_from, d.plain + checked_from,
                                        devs[1 - i].c + checked_from, int64_t(mn) - checked_from, counter);
        CHECK(cudaGetLastError());
        unsigned long long here = 0;
        CHECK(cudaMemcpy(&here, counter, sizeof(here), cudaMemcpyDeviceToHost));
        CHECK(cudaFree(counter));
        bad += here;
      }
    }
    const std::vector<float>& v = c.us;
    std::printf("%-30s %9.1f  (min %.1f, max %.1f)%s\n", c.name.c_str(), median(v), *std::min_element(v.begin(), v.end()),
                *std::max_element(v.begin(), v.end()),
                !c.peer_c ? "" : bad == 0 ? "   D = plain + peer C: checked" : "   WRONG: D != plain + peer C");
    all_right = all_right && bad == 0;
  }
  return all_right ? 0 : 1;
}
