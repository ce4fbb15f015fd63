// Probe: how fast CUTLASS's own sm_90a GEMM kernels run the row-parallel shapes at mid M,
// by tile shape and kernel schedule, against cuBLAS (what torch.matmul runs). Design data
// for the W = 2 o_proj M = 512 row, whose tile exchange needs two waves of tiles and so
// 128 x 128 tiles (the tile GEMM's cooperative 128 x 128 configuration takes ~51 µs there,
// cuBLAS ~47; benchmarks/NOTES.md, "Ping-pong tiles at M = 512").
//
//   D[M, N] = A[M, K] @ W[N, K]^T, bf16, fp32 accumulation, one GPU:
//     cublas          cublasGemmEx (W transposed, as F.linear)
//     coop 128x256    both consumer warp groups on one 128 x 256 tile (one wave at M = 512)
//     coop 128x128    both consumer warp groups on one 128 x 128 tile (two waves)
//     pingpong 128x128  one warp group per 128 x 128 tile; one group's epilogue runs under
//                     the other's MMAs (two waves)
//     pingpong 64x256   one warp group per 64 x 256 tile (two waves)
//     tile GEMM 128x128 / 128x256 / pp 128x128  distfuse's tile GEMM (kernels/gemm/tile_gemm.h)
//                     as the pair exchange runs it (whole tiles, its grid), without flags or
//                     exchange; pp: its ping-pong configuration
//
// Each case is a CUDA graph of ten calls on ten weight sets (none read from L2), replayed
// after an L2 flush. The cases' replays are interleaved, one of each per round in a
// rotating order, so that a drift of the clocks reaches every case alike; µs per call,
// median and fastest of the rounds. Every case's D is compared with cuBLAS's.
//
//   C=.venv/lib/python3.11/site-packages/cutlass_library/source
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -I$C/include -I$C/tools/util/include -Icsrc -Icsrc/include \
//        benchmarks/micro/gemm_config_probe.cu csrc/kernels/gemm/tile_gemm.cu -lcublas -o gemm_config_probe
//   ./gemm_config_probe [M,K ...] [n=8192] [rounds=40]   # default pairs: 512,4096 512,2048
//                                                        # 512,14336 1024,4096
#include <cublas_v2.h>

#include <cmath>
#include <cstdio>
#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cutlass_probe.h"
#include "distfuse/tuning.h"
#include "kernels/gemm/tile_gemm.h"

namespace {

using probe::Element;

using Coop128x256 = probe::CoopGemm;
using Coop128x128 = probe::GemmOf<cute::Shape<cute::_128, cute::_128, cute::_64>,
                                  cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                  cutlass::epilogue::TmaWarpSpecializedCooperative>::Gemm;
using Pingpong128x128 = probe::PingpongGemm;
using Pingpong64x256 = probe::GemmOf<cute::Shape<cute::_64, cute::_256, cute::_64>,
                                     cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                     cutlass::epilogue::TmaWarpSpecialized>::Gemm;

constexpr int kSets = 10;

struct Case {
  std::string name;
  std::vector<Element*> d;  // one output per weight set
  cudaGraphExec_t exec = nullptr;
  std::vector<float> samples;
};

// The ten calls of `enqueue(i)` captured into one graph.
cudaGraphExec_t capture(cudaStream_t s, const std::function<void(int)>& enqueue) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < kSets; ++i) enqueue(i);
  CHECK(cudaStreamEndCapture(s, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphDestroy(graph));
  return exec;
}

template <class Gemm>
void add_cutlass_case(std::vector<Case>& cases, const char* name, cudaStream_t s, const probe::Shape& shape,
                      const Element* a, const std::vector<Element*>& w,
                      std::vector<std::unique_ptr<probe::GemmLaunch<Gemm>>>& keep) {
  Case c;
  c.name = name;
  for (int i = 0; i < kSets; ++i) {
    Element* d;
    CHECK(cudaMalloc(&d, size_t(shape.m) * shape.n * sizeof(Element)));
    c.d.push_back(d);
    keep.push_back(std::make_unique<probe::GemmLaunch<Gemm>>(0, s, shape, a, w[i], 0, shape.m, 0.f, d, d));
  }
  const size_t first = keep.size() - kSets;
  c.exec = capture(s, [&](int i) { keep[first + i]->run(s); });
  cases.push_back(std::move(c));
}

// max |x - ref| / max |ref| over one output.
float relative_difference(const Element* x, const Element* ref, size_t n) {
  std::vector<Element> hx(n), hr(n);
  CHECK(cudaMemcpy(hx.data(), x, n * sizeof(Element), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hr.data(), ref, n * sizeof(Element), cudaMemcpyDeviceToHost));
  float diff = 0.f, scale = 0.f;
  for (size_t i = 0; i < n; ++i) {
    diff = std::fmax(diff, std::fabs(float(hx[i]) - float(hr[i])));
    scale = std::fmax(scale, std::fabs(float(hr[i])));
  }
  return diff / scale;
}

void run_shape(const probe::Timing& timing, cublasHandle_t blas, const probe::Shape& shape, int rounds,
               int sm_count) {
  cudaStream_t s = timing.stream;
  Element* a;
  CHECK(cudaMalloc(&a, size_t(shape.m) * shape.k * sizeof(Element)));
  probe::fill_random(a, size_t(shape.m) * shape.k, 1);
  std::vector<Element*> w(kSets);
  for (int i = 0; i < kSets; ++i) {
    CHECK(cudaMalloc(&w[i], size_t(shape.n) * shape.k * sizeof(Element)));
    probe::fill_random(w[i], size_t(shape.n) * shape.k, 100 + i);
  }
  CHECK(cudaDeviceSynchronize());

  std::vector<Case> cases;
  {
    Case c;
    c.name = "cublas";
    for (int i = 0; i < kSets; ++i) {
      Element* d;
      CHECK(cudaMalloc(&d, size_t(shape.m) * shape.n * sizeof(Element)));
      c.d.push_back(d);
    }
    const float one = 1.f, zero = 0.f;
    CHECK(cublasSetStream(blas, s) == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown);
    c.exec = capture(s, [&](int i) {
      // D^T [N, M] = W [N, K] . A^T: column-major views of the row-major tensors.
      const cublasStatus_t st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, shape.n, shape.m, shape.k, &one, w[i],
                                             CUDA_R_16BF, shape.k, a, CUDA_R_16BF, shape.k, &zero, c.d[i],
                                             CUDA_R_16BF, shape.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      CHECK(st == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown);
    });
    cases.push_back(std::move(c));
  }
  std::vector<std::unique_ptr<probe::GemmLaunch<Coop128x256>>> k1;
  std::vector<std::unique_ptr<probe::GemmLaunch<Coop128x128>>> k2;
  std::vector<std::unique_ptr<probe::GemmLaunch<Pingpong128x128>>> k3;
  std::vector<std::unique_ptr<probe::GemmLaunch<Pingpong64x256>>> k4;
  add_cutlass_case(cases, "coop 128x256", s, shape, a, w, k1);
  add_cutlass_case(cases, "coop 128x128", s, shape, a, w, k2);
  add_cutlass_case(cases, "pingpong 128x128", s, shape, a, w, k3);
  add_cutlass_case(cases, "pingpong 64x256", s, shape, a, w, k4);
  for (const int tile_shape : {2, 3, 4}) {
    Case c;
    c.name = tile_shape == 2 ? "tile GEMM 128x128" : tile_shape == 3 ? "tile GEMM 128x256" : "tile GEMM pp 128x128";
    std::vector<distfuse::TileGemmParams> params(kSets);
    for (int i = 0; i < kSets; ++i) {
      Element* d;
      CHECK(cudaMalloc(&d, size_t(shape.m) * shape.n * sizeof(Element)));
      c.d.push_back(d);
      distfuse::TileGemmParams& p = params[i];
      p = distfuse::TileGemmParams{};
      p.a = a;
      p.b = w[i];
      p.d = d;
      p.lda = shape.k;
      p.ldb = shape.k;  // W [N, K]: B given transposed
      p.ldd = shape.n;
      p.m = shape.m;
      p.n = shape.n;
      p.k = shape.k;
      p.b_transposed = true;
      p.dtype = distfuse::DType::kBFloat16;
      p.tile_shape = tile_shape;
      // The pair exchange's grid: equal whole waves of tiles (distfuse/tuning.h).
      const int tile_m = distfuse::tile_gemm_tile_m(p), tile_n = distfuse::tile_gemm_tile_n(p);
      const int64_t tiles = int64_t((shape.m + tile_m - 1) / tile_m) * ((shape.n + tile_n - 1) / tile_n);
      p.sm_count = distfuse::exchange_ctas(tiles, sm_count);
      p.whole_tiles = true;
      if (distfuse::tile_gemm_workspace_bytes(p) != 0) {
        std::printf("tile GEMM: a whole-tile plan needs no workspace\n");
        std::exit(1);
      }
    }
    c.exec = capture(s, [&](int i) { CHECK(distfuse::launch_tile_gemm(params[i], s)); });
    cases.push_back(std::move(c));
  }

  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  const int warmups = 3;
  for (int r = 0; r < rounds + warmups; ++r) {
    for (size_t j = 0; j < cases.size(); ++j) {
      Case& c = cases[(j + r) % cases.size()];
      CHECK(cudaMemsetAsync(timing.flush, r, timing.flush_bytes, s));
      CHECK(cudaEventRecord(start, s));
      CHECK(cudaGraphLaunch(c.exec, s));
      CHECK(cudaEventRecord(stop, s));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (r >= warmups) c.samples.push_back(ms * 1000.f / kSets);
    }
  }
  std::printf("M = %d, N = %d, K = %d (µs per call, median of %d rounds; min; max rel. diff vs cublas)\n", shape.m,
              shape.n, shape.k, rounds);
  const size_t n = size_t(shape.m) * shape.n;
  // The host compares 2 x M x N elements per set: at large M only the first set.
  const int compared_sets = n <= (size_t(16) << 20) ? kSets : 1;
  for (Case& c : cases) {
    float worst = 0.f;
    for (int i = 0; i < compared_sets; ++i) worst = std::fmax(worst, relative_difference(c.d[i], cases[0].d[i], n));
    std::printf("  %-18s %8.1f  %8.1f  %.2e\n", c.name.c_str(), probe::median(c.samples),
                *std::min_element(c.samples.begin(), c.samples.end()), worst);
    if (worst > 2e-2f) std::printf("  WRONG: %s differs from cublas\n", c.name.c_str());
  }
  for (Case& c : cases) {  // after every comparison: cases[0] holds the reference
    CHECK(cudaGraphExecDestroy(c.exec));
    for (Element* d : c.d) CHECK(cudaFree(d));
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  CHECK(cudaFree(a));
  for (Element* p : w) CHECK(cudaFree(p));
}

}  // namespace

int main(int argc, char** argv) {
  // Arguments: M,K pairs, then optionally n=N and rounds=R.
  std::vector<std::pair<int, int>> mk;
  int n = 8192, rounds = 40;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("n=", 0) == 0) n = std::atoi(arg.c_str() + 2);
    else if (arg.rfind("rounds=", 0) == 0) rounds = std::atoi(arg.c_str() + 7);
    else if (arg.find(',') != std::string::npos) mk.push_back({std::atoi(arg.c_str()), std::atoi(arg.c_str() + arg.find(',') + 1)});
  }
  if (mk.empty()) mk = {{512, 4096}, {512, 2048}, {512, 14336}, {1024, 4096}};
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line as it comes, also into a file
  CHECK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const probe::Timing timing = probe::make_timing();
  cublasHandle_t blas;
  CHECK(cublasCreate(&blas) == CUBLAS_STATUS_SUCCESS ? cudaSuccess : cudaErrorUnknown);
  for (const auto& [m, k] : mk) run_shape(timing, blas, probe::Shape{m, n, k}, rounds, prop.multiProcessorCount);
  return 0;
}
