// Probe: the decode-sized GEMM C[M, N] = A[M, K] · W[N, K]^T (nn.Linear's weight, bf16,
// fp32 accumulation) by every cuBLASLt algorithm the heuristic offers, and by those
// algorithms with split-K added, against cublasGemmEx's own choice (what torch.matmul
// runs). One GPU, no communication.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Icsrc/include \
//        benchmarks/micro/cublaslt_algo_probe.cu -lcublasLt -lcublas -o cublaslt_algo_probe
//   ./cublaslt_algo_probe 4096,2048 1,32,128     # K list, M list; N = 8192
//   ./cublaslt_algo_probe 4096 128 all 60        # also every tile, stage count, cluster
//                                                # shape and custom option of every algorithm,
//                                                # screened in a shuffled order for 60 s
//
// Times: a CUDA graph of 10 calls on 10 distinct weight sets after an L2 flush (µs per
// call, median of 30 replays; with `all`, candidates are screened on one replay each until
// the time is up and the 12 fastest are timed again on 30). Every timed candidate's output
// is compared with cublasGemmEx's.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "probe_check.h"

#define CHECK_BLAS(call)                                                         \
  do {                                                                           \
    int st_ = static_cast<int>(call);                                            \
    if (st_ != 0) {                                                              \
      std::fprintf(stderr, "%s:%d %s: status %d\n", __FILE__, __LINE__, #call, st_); \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

namespace {

constexpr int kN = 8192;
constexpr size_t kWorkspaceBytes = 32ull << 20;

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) v.push_back(std::atoi(item.c_str()));
  return v;
}

uint64_t config_of(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  // The attribute's own size first: a buffer of any other size is refused.
  size_t size = 0;
  CHECK_BLAS(cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, nullptr, 0, &size));
  uint64_t value = 0;
  size_t written = 0;
  CHECK_BLAS(cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &value, std::min(size, sizeof(value)), &written));
  return value;
}

std::string describe(const cublasLtMatmulAlgo_t& algo) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "id=%llu tile=%llu stages=%llu splitK=%llu red=%llu swz=%llu custom=%llu cluster=%llu",
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_ID),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
                (unsigned long long)config_of(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID));
  return buf;
}

// An algorithm capability that is an array of uint32 (tile or stage ids).
std::vector<uint32_t> cap_ids(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t attr) {
  size_t size = 0;
  CHECK_BLAS(cublasLtMatmulAlgoCapGetAttribute(&algo, attr, nullptr, 0, &size));
  std::vector<uint32_t> ids(size / sizeof(uint32_t));
  if (!ids.empty())
    CHECK_BLAS(cublasLtMatmulAlgoCapGetAttribute(&algo, attr, ids.data(), ids.size() * sizeof(uint32_t), &size));
  return ids;
}

int32_t cap_int(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t attr) {
  int32_t value = 0;
  size_t size = 0;
  CHECK_BLAS(cublasLtMatmulAlgoCapGetAttribute(&algo, attr, &value, sizeof(value), &size));
  return value;
}

template <typename T>
bool set_config(cublasLtMatmulAlgo_t* algo, cublasLtMatmulAlgoConfigAttributes_t attr, T value) {
  return cublasLtMatmulAlgoConfigSetAttribute(algo, attr, &value, sizeof(value)) == CUBLAS_STATUS_SUCCESS;
}

// bf16 bits to float.
float bf16(uint16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// max |got - want| / max |want| over the M x N output.
double relative_error(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, double(std::fabs(bf16(got[i]) - bf16(want[i]))));
    scale = std::max(scale, double(std::fabs(bf16(want[i]))));
  }
  return diff / std::max(scale, 1e-30);
}

struct Candidate {
  cublasLtMatmulAlgo_t algo;
  float us;
  double err;
};

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int> ks = parse_list(argc > 1 ? argv[1] : "4096,2048");
  const std::vector<int> ms = parse_list(argc > 2 ? argv[2] : "1,8,32,128,512");
  const bool everything = argc > 3 && std::strcmp(argv[3], "all") == 0;
  const double screen_seconds = argc > 4 ? std::atof(argv[4]) : 60.0;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, N = %d, bf16, A [M, K] row-major, W [N, K] row-major (C = A W^T)\n", prop.name, kN);
  const probe::Timing timing = probe::make_timing();
  cudaStream_t s = timing.stream;

  cublasHandle_t blas;
  cublasLtHandle_t lt;
  CHECK_BLAS(cublasCreate(&blas));
  CHECK_BLAS(cublasLtCreate(&lt));
  void* workspace;
  CHECK(cudaMalloc(&workspace, kWorkspaceBytes));
  CHECK_BLAS(cublasSetStream(blas, s));
  CHECK_BLAS(cublasSetWorkspace(blas, workspace, kWorkspaceBytes));
  const float one = 1.f, zero = 0.f;
  int mmax = 0;
  for (int m : ms) mmax = std::max(mmax, m);

  for (int k : ks) {
    std::vector<uint16_t*> w(10);
    for (auto& p : w) {
      CHECK(cudaMalloc(&p, size_t(kN) * k * 2));
      probe::fill_random<<<1024, 256>>>(p, int64_t(kN) * k, uint32_t(size_t(p)));
    }
    uint16_t *a, *out;
    CHECK(cudaMalloc(&a, size_t(mmax) * k * 2));
    CHECK(cudaMalloc(&out, size_t(mmax) * kN * 2));
    probe::fill_random<<<256, 256>>>(a, int64_t(mmax) * k, 7);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    for (int m : ms) {
      // Column-major view: C^T [N, M] = W [N, K] (W^T stored [K, N], ld K, op T) · A^T [K, M].
      auto gemm_ex = [&](int i) {
        CHECK_BLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, kN, m, k, &one, w[i], CUDA_R_16BF, k, a,
                                CUDA_R_16BF, k, &zero, out, CUDA_R_16BF, kN, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
      };
      std::vector<uint16_t> want(size_t(m) * kN), got(size_t(m) * kN);
      CHECK(cudaMemsetAsync(out, 0xff, size_t(m) * kN * 2, s));
      gemm_ex(0);
      CHECK(cudaStreamSynchronize(s));
      CHECK(cudaMemcpy(want.data(), out, want.size() * 2, cudaMemcpyDeviceToHost));
      const float t_default = probe::time_graph_of_ten(timing, gemm_ex);

      cublasLtMatmulDesc_t desc;
      cublasLtMatrixLayout_t lw, la, lc;
      CHECK_BLAS(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
      CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)));
      CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)));
      CHECK_BLAS(cublasLtMatrixLayoutCreate(&lw, CUDA_R_16BF, k, kN, k));
      CHECK_BLAS(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, m, k));
      CHECK_BLAS(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, kN, m, kN));
      cublasLtMatmulPreference_t pref;
      CHECK_BLAS(cublasLtMatmulPreferenceCreate(&pref));
      CHECK_BLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &kWorkspaceBytes, sizeof(kWorkspaceBytes)));
      std::vector<cublasLtMatmulHeuristicResult_t> heur(64);
      int found = 0;
      CHECK_BLAS(cublasLtMatmulAlgoGetHeuristic(lt, desc, lw, la, lc, lc, pref, int(heur.size()), heur.data(),
                                                &found));

      // Each offered algorithm, then split-K variants of it the library accepts.
      std::vector<cublasLtMatmulAlgo_t> algos;
      std::set<std::string> seen;
      auto add = [&](const cublasLtMatmulAlgo_t& algo) {
        cublasLtMatmulHeuristicResult_t check;
        if (cublasLtMatmulAlgoCheck(lt, desc, lw, la, lc, lc, &algo, &check) != CUBLAS_STATUS_SUCCESS) return;
        if (check.workspaceSize > kWorkspaceBytes) return;
        if (seen.insert(describe(algo)).second) algos.push_back(algo);
      };
      for (int h = 0; h < found; ++h) {
        add(heur[h].algo);
        for (uint32_t split : {2u, 3u, 4u, 6u, 8u, 12u, 16u})
          for (uint32_t scheme : {uint32_t(CUBLASLT_REDUCTION_SCHEME_INPLACE),
                                  uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)}) {
            cublasLtMatmulAlgo_t v = heur[h].algo;
            if (cublasLtMatmulAlgoConfigSetAttribute(&v, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split)) ||
                cublasLtMatmulAlgoConfigSetAttribute(&v, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                                     sizeof(scheme)))
              continue;
            add(v);
          }
      }
      const size_t offered = algos.size();
      if (everything) {
        int ids[128], n_ids = 0;
        CHECK_BLAS(cublasLtMatmulAlgoGetIds(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF,
                                            CUDA_R_16BF, 128, ids, &n_ids));
        for (int i = 0; i < n_ids; ++i) {
          cublasLtMatmulAlgo_t base;
          if (cublasLtMatmulAlgoInit(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF,
                                     CUDA_R_16BF, ids[i], &base))
            continue;
          std::vector<uint32_t> tiles = cap_ids(base, CUBLASLT_ALGO_CAP_TILE_IDS);
          std::vector<uint32_t> stages = cap_ids(base, CUBLASLT_ALGO_CAP_STAGES_IDS);
          if (tiles.empty()) tiles.push_back(0);
          if (stages.empty()) stages.push_back(0);
          const int32_t custom_max = cap_int(base, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX);
          const bool split_ok = cap_int(base, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT) != 0;
          for (uint32_t tile : tiles)
            for (uint32_t stage : stages)
              for (uint16_t cluster : {0, 2, 3, 4, 5, 6, 7, 8})
                for (uint32_t custom = 0; custom <= uint32_t(custom_max); ++custom)
                  for (uint32_t split : {1u, 2u, 4u}) {
                    if (split > 1 && !split_ok) continue;
                    cublasLtMatmulAlgo_t v = base;
                    const uint32_t scheme = split > 1 ? CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE : 0;
                    if (set_config(&v, CUBLASLT_ALGO_CONFIG_TILE_ID, tile) &&
                        set_config(&v, CUBLASLT_ALGO_CONFIG_STAGES_ID, stage) &&
                        set_config(&v, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, cluster) &&
                        set_config(&v, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, custom) &&
                        set_config(&v, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, split) &&
                        set_config(&v, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, scheme))
                      add(v);
                  }
        }
      }
      if (everything) std::printf("K=%5d M=%4d  %zu candidates to screen\n", k, m, algos.size()), std::fflush(stdout);
      auto time_one = [&](const cublasLtMatmulAlgo_t& algo, int replays) {
        return probe::time_graph_of_ten(timing, [&](int i) {
          CHECK_BLAS(cublasLtMatmul(lt, desc, &one, w[i], lw, a, la, &zero, out, lc, out, lc, &algo, workspace,
                                    kWorkspaceBytes, s));
        }, replays);
      };
      auto error_of = [&](const cublasLtMatmulAlgo_t& algo) {
        CHECK(cudaMemsetAsync(out, 0xff, size_t(m) * kN * 2, s));
        CHECK_BLAS(cublasLtMatmul(lt, desc, &one, w[0], lw, a, la, &zero, out, lc, out, lc, &algo, workspace,
                                  kWorkspaceBytes, s));
        CHECK(cudaStreamSynchronize(s));
        CHECK(cudaMemcpy(got.data(), out, got.size() * 2, cudaMemcpyDeviceToHost));
        return relative_error(got, want);
      };
      std::vector<cublasLtMatmulAlgo_t> finalists(algos.begin(), algos.begin() + offered);
      size_t screened_count = 0;
      if (algos.size() > offered) {
        // One replay each, in a shuffled order, until the time is up; the 12 fastest join
        // the offered ones.
        std::vector<cublasLtMatmulAlgo_t> rest(algos.begin() + offered, algos.end());
        std::shuffle(rest.begin(), rest.end(), std::mt19937(12345));
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(screen_seconds);
        std::vector<Candidate> screened;
        for (const auto& algo : rest) {
          if (std::chrono::steady_clock::now() > deadline) break;
          screened.push_back({algo, time_one(algo, 1), 0.0});
        }
        screened_count = screened.size();
        std::sort(screened.begin(), screened.end(), [](const Candidate& x, const Candidate& y) { return x.us < y.us; });
        for (size_t i = 0; i < std::min<size_t>(12, screened.size()); ++i) finalists.push_back(screened[i].algo);
      }
      std::vector<Candidate> results;
      for (const auto& algo : finalists) results.push_back({algo, time_one(algo, 30), error_of(algo)});
      if (everything) std::printf("K=%5d M=%4d  %zu of %zu screened\n", k, m, screened_count, algos.size() - offered);
      std::printf("K=%5d M=%4d  cublasGemmEx %7.2f us  (%d offered, %zu candidates)\n", k, m, t_default, found,
                  algos.size());
      if (!results.empty())
        std::printf("   heuristic #0 %7.2f us  err %.1e  %s\n", results[0].us, results[0].err,
                    describe(results[0].algo).c_str());
      std::sort(results.begin(), results.end(), [](const Candidate& x, const Candidate& y) { return x.us < y.us; });
      for (size_t i = 0; i < std::min<size_t>(5, results.size()); ++i)
        std::printf("   best %zu      %7.2f us  err %.1e  %s\n", i + 1, results[i].us, results[i].err,
                    describe(results[i].algo).c_str());
      std::fflush(stdout);
      CHECK_BLAS(cublasLtMatmulPreferenceDestroy(pref));
      CHECK_BLAS(cublasLtMatrixLayoutDestroy(lw));
      CHECK_BLAS(cublasLtMatrixLayoutDestroy(la));
      CHECK_BLAS(cublasLtMatrixLayoutDestroy(lc));
      CHECK_BLAS(cublasLtMatmulDescDestroy(desc));
    }
    for (auto p : w) CHECK(cudaFree(p));
    CHECK(cudaFree(a));
    CHECK(cudaFree(out));
  }
  return 0;
}
