// Probe: how fast TMA streams a weight matrix [N][K] (K contiguous) through a
// shared-memory ring, as the split-K decode schedule reads it, against plain HBM
// reads of the same bytes and against the split-K kernel's GEMM alone. One GPU, no
// communication; every sample reads weights that are not in L2.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc -Icsrc/include -I<cutlass>/include benchmarks/micro/tma_stream_probe.cu -lcuda \
//        -o tma_stream_probe
//   ./tma_stream_probe [K ...]       # K of the weights, default 4096 (W = 2 o_proj)
//
// Streaming variants (one line each): CTAs split K in groups of C as the clusters of
// the split-K schedule do (no cluster launch: the CTAs of a group only share rows),
// each group walks row blocks of 64 rows; a ring stage holds `boxes` boxes of 64 K x 64
// rows (one 128-byte swizzled row per weight row and box), one TMA copy each; `stages`
// stages; `pad` KB of shared memory left unused, as the token slice would take it.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/gemm/decode_split_k.cu"

#include "decode_probe_params.h"
#include "probe_check.h"

namespace stream_probe {

using namespace distfuse;

struct StreamArgs {
  CUtensorMap weights;  // boxes of 64 K x 64 rows, as the split-K kernel's
  int n, k, ctas_per_group, groups, boxes, stages;
  float* sink;
};

// kTokens == 0: thread 32 only waits for each stage and frees it. Else warps 4-7 run
// the split-K kernel's wgmma loop on it (m64 x kTokens x k16 against a token slice
// in shared memory that holds whatever was there: only the timing counts).
template <int kTokens>
__global__ void __launch_bounds__(256, 1) stream_kernel(const __grid_constant__ StreamArgs a) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;
  const int box_bytes = kBoxBytes, stage_bytes = a.boxes * box_bytes;
  const uint32_t bars = ring + a.stages * stage_bytes;
  const uint32_t tokens = (bars + 2 * 8 * a.stages + 1023u) & ~1023u;
  const auto full = [&](int s) { return bars + 8u * s; };
  const auto empty = [&](int s) { return bars + 8u * (a.stages + s); };
  if (threadIdx.x == 0) {
    for (int s = 0; s < a.stages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int slice = int(blockIdx.x) % a.ctas_per_group, group = int(blockIdx.x) / a.ctas_per_group;
  const int slice_boxes = int(ceil_div(ceil_div(a.k, a.ctas_per_group), kBlockK * a.boxes)) * a.boxes;
  const int k0 = slice * slice_boxes * kBlockK;
  const int stage_count = slice_boxes / a.boxes, row_blocks = a.n / kBlockN;
  if (threadIdx.x == 0) {
    int it = 0;
    for (int rb = group; rb < row_blocks; rb += a.groups) {
      for (int ks = 0; ks < stage_count; ++ks, ++it) {
        const int s = it % a.stages;
        mbar_wait(empty(s), ((it / a.stages) & 1) ^ 1);
        mbar_expect_tx(full(s), uint32_t(stage_bytes));
        const int kb = k0 / kBlockK + ks * a.boxes;
        for (int x = 0; x < a.boxes; ++x)
          tma_load_2d(ring + s * stage_bytes + x * box_bytes, &a.weights, full(s), (kb + x) * kBlockK, rb * kBlockN);
      }
    }
  } else if (kTokens == 0 && threadIdx.x == 32) {
    int it = 0;
    for (int rb = group; rb < row_blocks; rb += a.groups)
      for (int ks = 0; ks < stage_count; ++ks, ++it) {
        const int s = it % a.stages;
        mbar_wait(full(s), (it / a.stages) & 1);
        mbar_arrive_local(empty(s));
      }
  } else if (kTokens > 0 && threadIdx.x >= 128) {
    constexpr int kT = kTokens > 0 ? kTokens : 16;
    const int t = int(threadIdx.x) - 128;
    float acc[kT / 2];
    int it = 0;
    for (int rb = group; rb < row_blocks; rb += a.groups) {
      for (int ks = 0; ks < stage_count; ++ks, ++it) {
        const int s = it % a.stages;
        mbar_wait(full(s), (it / a.stages) & 1);
        wgmma_stage<__nv_bfloat16, kT>(acc, ring + s * stage_bytes, box_bytes, tokens, a.boxes, ks * a.boxes);
        if (ks > 0 && t == 0) mbar_arrive_local(empty((it - 1) % a.stages));
      }
      cute::warpgroup_wait<0>();
      fence_accumulators(acc);
      if (t == 0) mbar_arrive_local(empty((it - 1) % a.stages));
      if (acc[0] == 1.2345f) a.sink[t] = acc[1];  // keeps the accumulators live
    }
  }
}

struct Variant {
  int ctas_per_group, boxes, stages, pad_kb, tokens = 0;
};

}  // namespace stream_probe

int main(int argc, char** argv) {
  using namespace stream_probe;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs, L2 %d MB\n", prop.name, sms, prop.l2CacheSize >> 20);
  const probe::Timing timing = probe::make_timing();
  cudaStream_t s = timing.stream;
  const int n = 8192;
  std::vector<int> ks;
  for (int i = 1; i < argc; ++i) ks.push_back(std::atoi(argv[i]));
  if (ks.empty()) ks.push_back(4096);
  for (int k : ks) {
    std::vector<uint16_t*> w(10);
    for (auto& p : w) {
      CHECK(cudaMalloc(&p, size_t(n) * k * 2));
      probe::fill_random<<<1024, 256>>>(p, int64_t(n) * k, uint32_t(size_t(p)));
      CHECK(cudaGetLastError());
    }
    uint16_t *tok, *out;
    CHECK(cudaMalloc(&tok, size_t(128) * k * 2));
    CHECK(cudaMalloc(&out, size_t(128) * n * 2));
    probe::fill_random<<<256, 256>>>(tok, int64_t(128) * k, 7);
    CHECK(cudaDeviceSynchronize());
    const double mb = double(n) * k * 2 / 1e6;
    const auto report = [&](const std::string& what, float us) {
      std::printf("K=%5d  %-58s %7.1f us  %5.0f GB/s\n", k, what.c_str(), us, mb * 1e3 / us);
      std::fflush(stdout);
    };
    report("plain 16-byte reads, 4 CTAs/SM", probe::time_graph_of_ten(timing, [&](int i) {
             probe::read_kernel<8><<<sms * 4, 256, 0, s>>>(reinterpret_cast<const uint4*>(w[i]), int64_t(n) * k / 8,
                                                             timing.sink);
           }));

    std::vector<Variant> variants = {
        {1, 2, 5, 128},    {2, 2, 5, 64},     {8, 1, 7, 128},     {1, 2, 5, 0, 16},  {2, 2, 5, 0, 16},
        {2, 4, 4, 0, 16},  {2, 2, 5, 0, 32},  {4, 2, 5, 0, 32},   {8, 1, 7, 0, 128}, {8, 2, 4, 0, 128},
        {4, 2, 5, 0, 64},
    };
    for (const Variant& v : variants) {
      StreamArgs a{};
      a.n = n;
      a.k = k;
      a.ctas_per_group = v.ctas_per_group;
      a.boxes = v.boxes;
      a.stages = v.stages;
      a.sink = reinterpret_cast<float*>(timing.sink);
      const int slice_boxes = int(ceil_div(ceil_div(k, v.ctas_per_group), kBlockK * v.boxes)) * v.boxes;
      const int token_kb = v.tokens ? slice_boxes * v.tokens * kRowBytes / 1024 : 0;
      const int ring = v.stages * v.boxes * kBoxBytes;
      const int smem = 2048 + ring + (v.pad_kb + token_kb) * 1024 + 2 * v.stages * 8;
      if (smem > kSmemLimitBytes) {
        std::printf("K=%5d  (C=%d boxes=%d stages=%d tokens=%d: %d KB of shared memory, skipped)\n", k,
                    v.ctas_per_group, v.boxes, v.stages, v.tokens, smem >> 10);
        continue;
      }
      a.groups = std::min(n / kBlockN, sms / v.ctas_per_group);
      std::vector<CUtensorMap> maps(10);
      for (int i = 0; i < 10; ++i) {
        if (!encode_rows(&maps[i], w[i], DType::kBFloat16, n, k, k, kBlockN)) {
          std::fprintf(stderr, "tensor map encoding failed\n");
          return 1;
        }
      }
      char name[160];
      std::snprintf(name, sizeof name, "%s C=%d boxes=%d stages=%d ring=%dKB smem=%dKB grid=%d",
                    v.tokens ? ("wgmma Mt=" + std::to_string(v.tokens)).c_str() : "TMA only", v.ctas_per_group,
                    v.boxes, v.stages, ring >> 10, smem >> 10, a.groups * v.ctas_per_group);
      const auto kernel = v.tokens == 0     ? stream_kernel<0>
                          : v.tokens == 16  ? stream_kernel<16>
                          : v.tokens == 32  ? stream_kernel<32>
                          : v.tokens == 64  ? stream_kernel<64>
                                            : stream_kernel<128>;
      CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemLimitBytes));
      report(name, probe::time_graph_of_ten(timing, [&](int i) {
               a.weights = maps[i];
               kernel<<<a.groups * v.ctas_per_group, 256, smem, s>>>(a);
               CHECK(cudaGetLastError());
             }));
    }

    // The split-K kernel's GEMM alone (no all-reduce) over cluster sizes and stage boxes,
    // each with the deepest ring that fits beside its token slice.
    for (int m : {1, 32, 128}) {
      DecodeMatmulAllReduceParams p = probe::gemm_only_params(tok, out, m, n, k, sms);
      const SplitGeometry chosen = geometry_for(m, k);
      for (int ctas = 1; ctas <= kMaxClusterCtas; ctas *= 2)
        for (int boxes : {1, 2, 4}) {
          SplitGeometry g{};
          g.token_tile = token_tile_for(m);
          g.cluster = ctas;
          g.stage_boxes = boxes;
          g.k_blocks = int(ceil_div(ceil_div(k, ctas), kBlockK * boxes)) * boxes;
          g.stages = kMaxStages;
          while (g.stages > 2 && smem_bytes_for(g.token_tile, g.k_blocks, boxes, g.stages) > kSmemLimitBytes)
            --g.stages;
          g.smem_bytes = smem_bytes_for(g.token_tile, g.k_blocks, boxes, g.stages);
          if (g.smem_bytes > kSmemLimitBytes) continue;
          char name[160];
          std::snprintf(name, sizeof name, "split-K GEMM M=%d C=%d boxes=%d stages=%d tokens=%dKB%s", m, ctas, boxes,
                        g.stages, token_bytes(g.token_tile, g.k_blocks) >> 10,
                        ctas == chosen.cluster && boxes == chosen.stage_boxes ? " (chosen)" : "");
          report(name, probe::time_graph_of_ten(timing, [&](int i) {
                   p.b = w[i];
                   SplitKArgs args{};
                   args.p = p;
                   if (!encode_rows(&args.weights, p.b, p.dtype, p.n, p.k, p.ldb, kBlockN) ||
                       !encode_rows(&args.tokens, p.a, p.dtype, p.m, p.k, p.lda, g.token_tile)) {
                     std::fprintf(stderr, "tensor map encoding failed\n");
                     std::exit(1);
                   }
                   CHECK(launch_tokens<__nv_bfloat16>(args, g, s));
                 }));
        }
    }
    for (auto p : w) CHECK(cudaFree(p));
    CHECK(cudaFree(tok));
    CHECK(cudaFree(out));
  }
  return 0;
}
