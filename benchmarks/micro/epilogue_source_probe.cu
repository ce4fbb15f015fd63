// Probe: what does a Hopper GEMM lose when its epilogue reads a source tile C from
// the peer GPU's memory, and when copy-engine traffic runs beside it? Design data for
// the W = 2 schedule in which rank r's epilogue adds the peer's partial of each of its
// own tiles (benchmarks/NOTES.md, "the peer's partial as the epilogue's source").
//
// One process, GPU 0 and GPU 1 with peer access, the same GEMM on both at once (so
// every NVLink carries the traffic both ways, as in the schedule):
//
//   D[M, N] = A[M, K] @ W[N, K]^T (+ C)      bf16, fp32 accumulation, 128 x 256 x 64
//                                           tiles, persistent cooperative kernel
//
//   plain        beta = 0: no C is read
//   C local      beta = 1, C on this GPU
//   C peer       beta = 1, C on the other GPU (TMA loads over NVLink)
//   plain + CE   beta = 0, and a side stream copies half of D's bytes per GEMM
//                from the other GPU (cudaMemcpyPeerAsync), as the gather would
//   C peer + CE  both
//
//   halves ...   the same rows as two launches, [0, M/2) plain, then [M/2, M) as
//                named: the schedule's two phases (only the own half reads C)
//
//   C=.venv/lib/python3.11/site-packages/cutlass_library/source
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I$C/include -I$C/tools/util/include benchmarks/micro/epilogue_source_probe.cu \
//        -o epilogue_source_probe
//   ./epilogue_source_probe [M=8192] [N=8192] [K=4096]
#ifndef NDEBUG
#define NDEBUG  // CUTLASS's device asserts serialize the wgmma pipeline
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "probe_check.h"

#define CHECK_CUTLASS(x)                                                                              \
  do {                                                                                                \
    cutlass::Status s_ = (x);                                                                         \
    if (s_ != cutlass::Status::kSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cutlassGetStatusString(s_));     \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

namespace {

using Element = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;  // W [N, K] row-major is B [K, N] K-major
using LayoutC = cutlass::layout::RowMajor;
constexpr int kAlign = 8;
using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutC, kAlign, Element, LayoutC,
    kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutW, kAlign, float,
    TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

__global__ void fill_random(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    // bf16 in [-2, 2): sign, exponent 126-127, 7 random mantissa bits; never zero
    p[i] = uint16_t(((x >> 16) & 0x8000) | ((126 + ((x >> 8) & 1)) << 7) | (x & 0x7f));
  }
}

// Counts the elements where d differs from plain + c by more than bf16 rounding allows.
__global__ void count_mismatches(const Element* d, const Element* plain, const Element* c, int64_t n,
                                 unsigned long long* bad) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float want = float(plain[i]) + float(c[i]);
    const float got = float(d[i]);
    if (!(fabsf(got - want) <= 0.02f * fabsf(want) + 0.05f)) atomicAdd(bad, 1ull);
  }
}

// One GEMM launch over rows [row0, row0 + rows) of A and D.
struct Launch {
  Gemm gemm;
  void* workspace = nullptr;
  bool used = false;
};

struct Device {
  int id;
  cudaStream_t stream, copy_stream;
  Element *a, *w, *c, *d, *gather;  // gather: where the copy engine lands the peer's bytes
  Element* plain;                    // D of the plain GEMM, for the check of the C cases
  Launch launches[2];                // run back to back on `stream`
};

struct Shape {
  int m, n, k;
};

// Sets up launch `l` of `dev` over rows [row0, row0 + rows) with beta and a source C
// at `c` (any GPU's memory; the same rows are read).
void prepare(Device& dev, Launch& l, const Shape& s, int row0, int rows, float beta, const Element* c) {
  CHECK(cudaSetDevice(dev.id));
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  const size_t a_off = size_t(row0) * s.k, d_off = size_t(row0) * s.n;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {rows, s.n, s.k, 1},
      {dev.a + a_off, cutlass::make_cute_packed_stride(StrideA{}, {rows, s.k, 1}), dev.w,
       cutlass::make_cute_packed_stride(StrideB{}, {s.n, s.k, 1})},
      {{1.0f, beta}, c + d_off, cutlass::make_cute_packed_stride(StrideC{}, {rows, s.n, 1}), dev.d + d_off,
       cutlass::make_cute_packed_stride(StrideD{}, {rows, s.n, 1})}};
  CHECK_CUTLASS(l.gemm.can_implement(args));
  CHECK(cudaFree(l.workspace));
  l.workspace = nullptr;
  const size_t bytes = Gemm::get_workspace_size(args);
  if (bytes) CHECK(cudaMalloc(&l.workspace, bytes));
  CHECK_CUTLASS(l.gemm.initialize(args, l.workspace, dev.stream));
  l.used = true;
}

// Median over `iters` of the slower GPU's time per GEMM (µs), both GPUs running at
// once; with `copy_bytes`, each GPU's copy stream pulls that many bytes from the
// other GPU per GEMM, in 4 pieces, for as long as the GEMMs run.
double time_both(std::vector<Device>& devs, int iters, size_t copy_bytes) {
  std::vector<float> worst;
  for (int it = -3; it < iters; ++it) {
    std::vector<cudaEvent_t> start(devs.size()), stop(devs.size());
    for (size_t i = 0; i < devs.size(); ++i) {
      Device& d = devs[i];
      const Device& peer = devs[1 - i];
      CHECK(cudaSetDevice(d.id));
      CHECK(cudaEventCreate(&start[i]));
      CHECK(cudaEventCreate(&stop[i]));
      CHECK(cudaEventRecord(start[i], d.stream));
      if (copy_bytes) {
        CHECK(cudaStreamWaitEvent(d.copy_stream, start[i]));
        for (int piece = 0; piece < 4; ++piece)
          CHECK(cudaMemcpyPeerAsync(reinterpret_cast<char*>(d.gather) + piece * (copy_bytes / 4), d.id,
                                    reinterpret_cast<const char*>(peer.d) + piece * (copy_bytes / 4), peer.id,
                                    copy_bytes / 4, d.copy_stream));
      }
      for (Launch& l : d.launches)
        if (l.used) CHECK_CUTLASS(l.gemm.run(d.stream));
      CHECK(cudaEventRecord(stop[i], d.stream));
    }
    float slowest = 0.f;
    for (size_t i = 0; i < devs.size(); ++i) {
      CHECK(cudaSetDevice(devs[i].id));
      CHECK(cudaEventSynchronize(stop[i]));
      CHECK(cudaStreamSynchronize(devs[i].copy_stream));
      float ms = 0.f;
      CHECK(cudaEventElapsedTime(&ms, start[i], stop[i]));
      slowest = std::max(slowest, ms);
      CHECK(cudaEventDestroy(start[i]));
      CHECK(cudaEventDestroy(stop[i]));
    }
    if (it >= 0) worst.push_back(slowest * 1000.f);
  }
  std::sort(worst.begin(), worst.end());
  return worst[worst.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const Shape s{argc > 1 ? std::atoi(argv[1]) : 8192, argc > 2 ? std::atoi(argv[2]) : 8192,
                argc > 3 ? std::atoi(argv[3]) : 4096};
  int count = 0;
  CHECK(cudaGetDeviceCount(&count));
  if (count < 2) {
    std::fprintf(stderr, "needs 2 GPUs, found %d\n", count);
    return 1;
  }
  std::vector<Device> devs(2);
  const size_t mk = size_t(s.m) * s.k, nk = size_t(s.n) * s.k, mn = size_t(s.m) * s.n;
  for (int i = 0; i < 2; ++i) {
    Device& d = devs[i];
    d.id = i;
    CHECK(cudaSetDevice(i));
    int can = 0;
    CHECK(cudaDeviceCanAccessPeer(&can, i, 1 - i));
    if (!can) {
      std::fprintf(stderr, "GPU %d cannot access GPU %d\n", i, 1 - i);
      return 1;
    }
    CHECK(cudaDeviceEnablePeerAccess(1 - i, 0));
    CHECK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&d.copy_stream, cudaStreamNonBlocking));
    CHECK(cudaMalloc(&d.a, mk * sizeof(Element)));
    CHECK(cudaMalloc(&d.w, nk * sizeof(Element)));
    CHECK(cudaMalloc(&d.c, mn * sizeof(Element)));
    CHECK(cudaMalloc(&d.d, mn * sizeof(Element)));
    CHECK(cudaMalloc(&d.gather, mn * sizeof(Element)));
    CHECK(cudaMalloc(&d.plain, mn * sizeof(Element)));
    fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(d.a), int64_t(mk), 11u + i);
    CHECK(cudaGetLastError());
    fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(d.w), int64_t(nk), 23u + i);
    CHECK(cudaGetLastError());
    fill_random<<<1024, 256>>>(reinterpret_cast<uint16_t*>(d.c), int64_t(mn), 37u + i);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s x 2, M = %d, N = %d, K = %d, µs per GEMM (median of 30, slower GPU)\n", prop.name, s.m, s.n, s.k);

  const size_t half_output = mn * sizeof(Element) / 2;  // what each rank gathers per call
  struct Case {
    const char* name;
    float beta;
    int source;         // 1: this GPU's C (unread with beta = 0), 2: the other GPU's C
    bool copies;        // the gather's copy-engine traffic beside the GEMM
    bool halves;        // rows [0, M/2) plain, then rows [M/2, M) with the source: the schedule's phases
  };
  const Case cases[] = {{"plain", 0.f, 1, false, false},         {"C local", 1.f, 1, false, false},
                        {"C peer", 1.f, 2, false, false},        {"plain + CE", 0.f, 1, true, false},
                        {"C peer + CE", 1.f, 2, true, false},    {"halves", 0.f, 1, false, true},
                        {"halves, C peer", 1.f, 2, false, true}, {"halves, C peer + CE", 1.f, 2, true, true},
                        {"plain (again)", 0.f, 1, false, false}};
  for (const Case& c : cases) {
    for (int i = 0; i < 2; ++i) {
      Device& d = devs[i];
      const Element* source = c.source == 1 ? d.c : devs[1 - i].c;
      for (Launch& l : d.launches) l.used = false;
      if (c.halves) {
        prepare(d, d.launches[0], s, 0, s.m / 2, 0.f, d.c);
        prepare(d, d.launches[1], s, s.m / 2, s.m - s.m / 2, c.beta, source);
      } else {
        prepare(d, d.launches[0], s, 0, s.m, c.beta, source);
      }
    }
    const double us = time_both(devs, 30, c.copies ? half_output : 0);
    // Every case leaves its D: keep the plain one, check that the peer's C was added.
    const int64_t checked_from = c.halves ? int64_t(s.m / 2) * s.n : 0;
    unsigned long long bad[2] = {0, 0};
    for (int i = 0; i < 2; ++i) {
      Device& d = devs[i];
      CHECK(cudaSetDevice(d.id));
      if (c.beta == 0.f && !c.copies && !c.halves) {
        CHECK(cudaMemcpy(d.plain, d.d, mn * sizeof(Element), cudaMemcpyDeviceToDevice));
      } else if (c.source == 2) {
        unsigned long long* counter = nullptr;
        CHECK(cudaMalloc(&counter, sizeof(*counter)));
        CHECK(cudaMemset(counter, 0, sizeof(*counter)));
        count_mismatches<<<1024, 256>>>(d.d + checked_from, d.plain + checked_from, devs[1 - i].c + checked_from,
                                        int64_t(mn) - checked_from, counter);
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpy(&bad[i], counter, sizeof(*counter), cudaMemcpyDeviceToHost));
        CHECK(cudaFree(counter));
      }
    }
    std::printf("%-22s %9.1f%s\n", c.name, us,
                c.source == 2 ? (bad[0] + bad[1] == 0 ? "   (D = plain + peer C: checked)" : "   WRONG: D != plain + peer C")
                              : "");
    if (c.source == 2 && bad[0] + bad[1] != 0) return 1;
  }
  return 0;
}
