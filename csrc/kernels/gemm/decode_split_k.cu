// Decode matmul_all_reduce split over K in clusters; the schedule is drawn in the header.
#include "kernels/gemm/decode_split_k.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "distfuse/comm/handle.h"
#include "distfuse/comm/signal.cuh"
#include "kernels/common/launch.cuh"
#include "kernels/common/vec.cuh"
#include "kernels/gemm/decode_matmul_all_reduce.h"  // decode_operands_valid
#include "kernels/gemm/tile_pair_exchange.cuh"  // exchange_timeout_record / exchange_timeout_check

namespace distfuse {
namespace {

namespace gmma = cute::SM90::GMMA;

constexpr int kThreads = 256;
constexpr int kCommThread0 = 32;  // warps 1-3: cluster sum, pushes, rank sum
constexpr int kCommThreads = 96;
constexpr int kMmaThread0 = 128;  // warps 4-7: the wgmma warpgroup
constexpr int kMmaThreads = 128;
constexpr int kBlockN = 64;                         // output columns per block (wgmma M)
constexpr int kBlockK = 64;                         // K per stage: one 128-byte swizzled row
constexpr int kRowBytes = kBlockK * 2;              // 128
constexpr int kBoxBytes = kBlockN * kRowBytes;      // 8 KB: weights of one 64-K box
constexpr int kPartialPitch = kBlockN + 4;          // floats per partial row (+4: no bank conflicts)
constexpr int kTokenBudgetBytes = 128 << 10;        // token slice in shared memory at most
constexpr int kMaxStages = 16;
constexpr int kMinStages = 3;
constexpr int kMaxClusterCtas = 8;                  // portable cluster size
constexpr int kSmemLimitBytes = 227 << 10;
constexpr int kMmaBarrier = 1, kCommBarrier = 2;    // named barriers (0 is __syncthreads)
// A cluster-internal wait longer than the peer timeout plus this is a defect of the kernel.
constexpr uint64_t kClusterWaitMarginNs = 10ull * 1000 * 1000 * 1000;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry of a launch, the same on every rank.
struct SplitGeometry {
  int token_tile;  // Mt
  int cluster;     // C
  int k_blocks;    // 64-deep K blocks per slice (a multiple of stage_boxes)
  int stage_boxes; // 64-deep K blocks per ring stage
  int stages;      // S
  int smem_bytes;
};

struct SplitKArgs {
  CUtensorMap weights;  // [N][K] (K contiguous), box 64 K x 64 columns, 128-byte swizzle
  CUtensorMap tokens;   // [M][K], box 64 K x Mt rows, 128-byte swizzle
  DecodeMatmulAllReduceParams p;
  int cluster, k_blocks, stage_boxes, stages, clusters;
};

// ---------------------------------------------------------------------------------
// Shared-memory plan: [tokens: k_blocks x Mt x 128 B][ring: S x 8 KB][partial: Mt x
// kPartialPitch floats][mbarriers], from a 1024-byte aligned base (128-byte swizzle
// atoms are 1024 bytes).
__host__ __device__ constexpr int token_bytes(int token_tile, int k_blocks) { return k_blocks * token_tile * kRowBytes; }
__host__ __device__ constexpr int partial_bytes(int token_tile) { return token_tile * kPartialPitch * 4; }
__host__ __device__ constexpr int barrier_bytes(int stages) { return (2 * stages + 2) * 8; }
__host__ __device__ constexpr int smem_bytes_for(int token_tile, int k_blocks, int stage_boxes, int stages) {
  return 1024 + token_bytes(token_tile, k_blocks) + stages * stage_boxes * kBoxBytes + partial_bytes(token_tile) +
         barrier_bytes(stages);
}

// ---------------------------------------------------------------------------------
// PTX helpers (mbarriers, TMA, DSMEM, wgmma descriptors).
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive_local(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// One arrival on the barrier at the same offset in each of the cluster's `ctas` CTAs,
// ordering this thread's earlier accesses (and those of threads it synchronized with)
// before all of them: one cluster-wide fence, then relaxed arrivals. A release on each
// arrival costs a fence per arrival: at C = 8 a column block's boundary took 2.4-3x as long
// (NOTES.md, v47).
__device__ __forceinline__ void mbar_arrive_every_cta(uint32_t bar, int ctas) {
  asm volatile("fence.acq_rel.cluster;" ::: "memory");
  for (int cta = 0; cta < ctas; ++cta)
    asm volatile(
        "{\n\t.reg .b32 remote;\n\t"
        "mapa.shared::cluster.u32 remote, %0, %1;\n\t"
        "mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [remote];\n\t}" ::"r"(bar),
        "r"(cta)
        : "memory");
}
// kClusterScope: the phase was completed by arrivals of other CTAs, whose writes the
// waiter reads next; else by this CTA's threads or its own TMA copies.
template <bool kClusterScope>
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  if (kClusterScope)
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.b32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  else
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.b32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  return done != 0;
}
// Wait for the completion of the barrier's phase of parity `parity`. Every phase
// depends, through the ring and the cluster sum, on the comm warps, which may wait up
// to the call's timeout for a late peer (then go on without it); a wait past that
// timeout plus a margin is a defect of this kernel: it reports and traps.
// The clock is first read after 4096 failed tries (each try already blocks in hardware
// for a while): reading it on every wait costs the pipeline more than the wait itself.
template <bool kClusterScope = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity, uint64_t peer_timeout_ns) {
  uint64_t start = 0;
  for (uint32_t spins = 1; !mbar_try_wait<kClusterScope>(bar, parity); ++spins) {
    if ((spins & 4095u) != 0) continue;
    const uint64_t now = global_timer_ns();
    if (start == 0) {
      start = now;
    } else if (now - start > timeout_bound_ns(peer_timeout_ns) + kClusterWaitMarginNs) {
      printf("distfuse: matmul_all_reduce (split-K decode schedule): block %d waited %llu ns on a "
             "cluster-internal barrier\n",
             int(blockIdx.x), static_cast<unsigned long long>(now - start));
      __trap();
    }
  }
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ int cluster_cta_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return int(r);
}
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// 8 floats of CTA `cta`'s shared memory at the local address `addr`.
__device__ __forceinline__ void load_remote_8(uint32_t addr, int cta, float (&x)[8]) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(cta));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(x[0]), "=f"(x[1]), "=f"(x[2]), "=f"(x[3])
               : "r"(remote));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(x[4]), "=f"(x[5]), "=f"(x[6]), "=f"(x[7])
               : "r"(remote + 16));
}

// wgmma shared-memory descriptor of a K-major operand in 128-byte swizzle atoms (8
// rows of 128 bytes, 1024 bytes apart); `addr` is the first row's K offset.
__device__ __forceinline__ uint64_t kmajor_sw128_desc(uint32_t addr) {
  uint64_t d = uint64_t((addr & 0x3FFFF) >> 4);  // start address
  d |= uint64_t(1) << 16;                        // leading byte offset: unused with swizzle
  d |= uint64_t(1024 >> 4) << 32;                // stride byte offset: 8 rows
  d |= uint64_t(1) << 62;                        // 128-byte swizzle
  return d;
}

template <typename T, int kN>
struct WgmmaOp;
#define DF_WGMMA_OP(T, N, NAME) \
  template <>                   \
  struct WgmmaOp<T, N> {        \
    using Op = gmma::NAME<gmma::Major::K, gmma::Major::K>; \
  };
DF_WGMMA_OP(__nv_bfloat16, 8, MMA_64x8x16_F32BF16BF16_SS)
DF_WGMMA_OP(__nv_bfloat16, 16, MMA_64x16x16_F32BF16BF16_SS)
DF_WGMMA_OP(__nv_bfloat16, 32, MMA_64x32x16_F32BF16BF16_SS)
DF_WGMMA_OP(__nv_bfloat16, 64, MMA_64x64x16_F32BF16BF16_SS)
DF_WGMMA_OP(__nv_bfloat16, 128, MMA_64x128x16_F32BF16BF16_SS)
DF_WGMMA_OP(__half, 8, MMA_64x8x16_F32F16F16_SS)
DF_WGMMA_OP(__half, 16, MMA_64x16x16_F32F16F16_SS)
DF_WGMMA_OP(__half, 32, MMA_64x32x16_F32F16F16_SS)
DF_WGMMA_OP(__half, 64, MMA_64x64x16_F32F16F16_SS)
DF_WGMMA_OP(__half, 128, MMA_64x128x16_F32F16F16_SS)
#undef DF_WGMMA_OP

template <typename Op, int kRegs, int... I>
__device__ __forceinline__ void wgmma_unpacked(uint64_t a, uint64_t b, float (&d)[kRegs], gmma::ScaleOut scale,
                                               std::integer_sequence<int, I...>) {
  Op::fma(a, b, d[I]..., scale);
}
template <typename T, int kN>
__device__ __forceinline__ void wgmma(uint64_t a, uint64_t b, float (&d)[kN / 2], bool accumulate) {
  wgmma_unpacked<typename WgmmaOp<T, kN>::Op>(a, b, d, accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero,
                                              std::make_integer_sequence<int, kN / 2>{});
}
template <int kRegs>
__device__ __forceinline__ void fence_accumulators(float (&d)[kRegs]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// One ring stage's wgmma as one committed batch: `boxes` 64-K boxes of weights, `box_bytes`
// apart from `stage`, against the token boxes from `kb0` (the first of a block, kb0 = 0,
// starts the accumulators from zero); returns when at most this batch is in flight, so the
// stage before it is read.
template <typename T, int kTokens>
__device__ __forceinline__ void wgmma_stage(float (&acc)[kTokens / 2], uint32_t stage, int box_bytes, uint32_t tokens,
                                            int boxes, int kb0) {
  fence_accumulators(acc);
  cute::warpgroup_arrive();
  for (int x = 0; x < boxes; ++x) {
    const int kb = kb0 + x;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk)
      wgmma<T, kTokens>(kmajor_sw128_desc(stage + x * box_bytes + kk * 32),
                        kmajor_sw128_desc(tokens + kb * kTokens * kRowBytes + kk * 32), acc, kb > 0 || kk > 0);
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<1>();
  fence_accumulators(acc);
}

// kChannelDecodeGemm flags on rank `rank`: entry of `src`, and `src`'s rows of piece `piece` landed.
__device__ __forceinline__ uint32_t* entry_flag(const CommHandle& c, int rank, int src) {
  return c.flags(rank, kChannelDecodeGemm) + src;
}
__device__ __forceinline__ uint32_t* piece_flag(const CommHandle& c, int rank, int64_t piece, int src) {
  return c.flags(rank, kChannelDecodeGemm) + kMaxWorld * (1 + piece) + src;
}

template <typename T, int kTokens>
__global__ void __launch_bounds__(kThreads, 1) decode_split_k_kernel(const __grid_constant__ SplitKArgs args) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ int aborted;  // warps 1-3: a wait on a peer timed out
  const DecodeMatmulAllReduceParams& p = args.p;
  const CommHandle& c = p.comm;
  const int kb_count = args.k_blocks, stages = args.stages, ctas = args.cluster, boxes = args.stage_boxes;
  const int stage_bytes = boxes * kBoxBytes, stage_count = kb_count / boxes;

  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  float* partial_ptr = reinterpret_cast<float*>(smem_raw + (base - raw) + token_bytes(kTokens, kb_count) +
                                                stages * stage_bytes);
  const uint32_t tokens = base;
  const uint32_t ring = tokens + token_bytes(kTokens, kb_count);
  const uint32_t partial = ring + stages * stage_bytes;
  const uint32_t bars = partial + partial_bytes(kTokens);
  const auto full = [&](int s) { return bars + 8u * s; };
  const auto empty = [&](int s) { return bars + 8u * (stages + s); };
  const uint32_t partial_full = bars + 16u * stages, partial_empty = partial_full + 8;

  const int cta = cluster_cta_rank();
  const int cluster_id = int(blockIdx.x) / ctas;
  const int blocks = p.n / kBlockN;
  const int rounds = cluster_id < blocks ? (blocks - 1 - cluster_id) / args.clusters + 1 : 0;
  const int k0 = cta * kb_count * kBlockK;
  const int rank = c.rank, world = c.world;
  const int64_t mn = int64_t(p.m) * p.n;

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 1);
    }
    mbar_init(partial_full, ctas);
    mbar_init(partial_empty, ctas);
    aborted = 0;
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync_all();

  uint32_t* epoch_value = c.counters(kChannelDecodeGemm);
  const uint32_t epoch = p.all_reduce ? next_epoch(*epoch_value) : 0;
  if (p.all_reduce && blockIdx.x == 0 && int(threadIdx.x) < world && int(threadIdx.x) != rank)
    store_release_sys(entry_flag(c, int(threadIdx.x), rank), epoch);

  if (threadIdx.x == 0 && rounds > 0) {
    // ---- loads: the weights of every block, stage by stage; the first block's stages
    // also bring the token slice's boxes of their K, so the first wgmma waits for one
    // stage, not for the whole slice (up to 128 KB, ~2-5 us of L2 reads at the start).
    constexpr int kTokenBoxBytes = kTokens * kRowBytes;
    int it = 0;
    for (int j = 0; j < rounds; ++j) {
      const int n0 = (cluster_id + j * args.clusters) * kBlockN;
      for (int ks = 0; ks < stage_count; ++ks, ++it) {
        const int s = it % stages;
        mbar_wait(empty(s), ((it / stages) & 1) ^ 1, c.timeout_ns);
        mbar_expect_tx(full(s), uint32_t(stage_bytes + (j == 0 ? boxes * kTokenBoxBytes : 0)));
        for (int x = 0; x < boxes; ++x) {
          const int kb = ks * boxes + x;
          if (j == 0) tma_load_2d(tokens + kb * kTokenBoxBytes, &args.tokens, full(s), k0 + kb * kBlockK, 0);
          tma_load_2d(ring + s * stage_bytes + x * kBoxBytes, &args.weights, full(s), k0 + kb * kBlockK, n0);
        }
      }
    }
  } else if (threadIdx.x >= kMmaThread0 && rounds > 0) {
    // ---- wgmma: 64 columns x Mt tokens per block over this CTA's K slice.
    const int t = int(threadIdx.x) - kMmaThread0, w = t / 32, l = t % 32;
    float acc[kTokens / 2];
    int it = 0;
    for (int j = 0; j < rounds; ++j) {
      for (int ks = 0; ks < stage_count; ++ks, ++it) {
        const int s = it % stages;
        mbar_wait(full(s), (it / stages) & 1, c.timeout_ns);
        wgmma_stage<T, kTokens>(acc, ring + s * stage_bytes, kBoxBytes, tokens, boxes, ks * boxes);
        // The stage before this one is read: free it (the last stage of a block is
        // freed after the block's final wait below).
        if (ks > 0 && t == 0) mbar_arrive_local(empty((it - 1) % stages));
      }
      cute::warpgroup_wait<0>();
      fence_accumulators(acc);
      if (t == 0) mbar_arrive_local(empty((it - 1) % stages));
      if (j > 0) mbar_wait<true>(partial_empty, (j - 1) & 1, c.timeout_ns);
      // Accumulator i of thread (w, l): column w·16 + l/4 + 8·((i/2) mod 2), token
      // (i/4)·8 + 2·(l mod 4) + (i mod 2).
#pragma unroll
      for (int i = 0; i < kTokens / 2; ++i) {
        const int col = w * 16 + l / 4 + 8 * ((i >> 1) & 1);
        const int tok = (i >> 2) * 8 + 2 * (l & 3) + (i & 1);
        partial_ptr[tok * kPartialPitch + col] = acc[i];
      }
      named_sync(kMmaBarrier, kMmaThreads);
      if (t == 0) mbar_arrive_every_cta(partial_full, ctas);
    }
  } else if (threadIdx.x >= kCommThread0 && threadIdx.x < kMmaThread0 && rounds > 0) {
    // ---- warps 1-3: per block, the cluster sum of this CTA's rows and the pushes.
    const int t = int(threadIdx.x) - kCommThread0;
    const int rows_per_cta = kTokens / ctas;
    const int row0 = cta * rows_per_cta;
    const int rows = max(0, min(rows_per_cta, p.m - row0));
    const int units = rows * (kBlockN / 8);  // 8 columns each
    constexpr int kMaxUnits = kTokens * (kBlockN / 8) / kCommThreads + 1;
    T* out = static_cast<T*>(p.output);
    const T* bias = static_cast<const T*>(p.bias);
    const T* own_slots = reinterpret_cast<const T*>(c.peer_base[rank] + c.layout.tiles_offset) + mn;
    const auto unit_offset = [&](int b, int u) {  // element offset of unit u of block b in out
      return int64_t(row0 + u / (kBlockN / 8)) * p.n + b * kBlockN + (u % (kBlockN / 8)) * 8;
    };
    // Σ over ranks of block b's rows (rank order, fp32) + bias, rounded once.
    const auto sum_ranks = [&](int b) {
      const int64_t piece = int64_t(b) * ctas + cta;
      if (t < world && t != rank && !aborted &&
          !poll_or_record_timeout(c, piece_flag(c, rank, piece, t), epoch, kExchangeTimeoutTile, int(piece), t))
        aborted = 1;
      named_sync(kCommBarrier, kCommThreads);
      if (aborted) return;
      for (int u = t; u < units; u += kCommThreads) {
        const int64_t off = unit_offset(b, u);
        uint4 x[kMaxWorld];  // every load in flight before the first add
#pragma unroll
        for (int src = 0; src < kMaxWorld; ++src)
          if (src < world) x[src] = load_cg(own_slots + src * mn + off);
        float s[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) s[e] = 0.f;
#pragma unroll
        for (int src = 0; src < kMaxWorld; ++src)
          if (src < world) accumulate<T, 16>(s, to_pack<T>(x[src]));
        if (bias) {
          const Pack<T, 16> bv = to_pack<T>(load_plain(bias + (off % p.n)));
#pragma unroll
          for (int e = 0; e < 8; ++e) s[e] += to_float(bv.elem(e));
        }
        store_plain(out + off, from_pack<T>(round_pack<T, 16>(s)));
      }
    };

    bool entered = false;
    for (int j = 0; j < rounds; ++j) {
      const int b = cluster_id + j * args.clusters;
      mbar_wait<true>(partial_full, j & 1, c.timeout_ns);
      uint4 mine[kMaxUnits];
#pragma unroll
      for (int x = 0; x < kMaxUnits; ++x) {
        const int u = t + x * kCommThreads;
        if (u >= units) continue;
        const int row = row0 + u / (kBlockN / 8), col = (u % (kBlockN / 8)) * 8;
        const uint32_t addr = partial + uint32_t((row * kPartialPitch + col) * 4);
        float v[kMaxClusterCtas][8];  // every load in flight before the first add
#pragma unroll
        for (int q = 0; q < kMaxClusterCtas; ++q)
          if (q < ctas) load_remote_8(addr, q, v[q]);
        float s[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) s[e] = 0.f;
#pragma unroll
        for (int q = 0; q < kMaxClusterCtas; ++q)  // K slices in order: every run agrees
          if (q < ctas)
#pragma unroll
            for (int e = 0; e < 8; ++e) s[e] += v[q][e];
        mine[x] = from_pack<T>(round_pack<T, 16>(s));
      }
      named_sync(kCommBarrier, kCommThreads);  // the cluster's partials are read
      if (t == 0) mbar_arrive_every_cta(partial_empty, ctas);

      if (!p.all_reduce) {
#pragma unroll
        for (int x = 0; x < kMaxUnits; ++x)
          if (t + x * kCommThreads < units) store_plain(out + unit_offset(b, t + x * kCommThreads), mine[x]);
        continue;
      }
      if (!entered) {
        if (t < world && t != rank &&
            !poll_or_record_timeout(c, entry_flag(c, rank, t), epoch, kExchangeTimeoutEntry, int(blockIdx.x), t))
          aborted = 1;
        named_sync(kCommBarrier, kCommThreads);
        entered = true;
      }
      if (aborted) continue;
#pragma unroll
      for (int x = 0; x < kMaxUnits; ++x) {
        const int u = t + x * kCommThreads;
        if (u >= units) continue;
        const int64_t off = unit_offset(b, u);
        for (int k = 0; k < world; ++k) {  // own slot first, then the peers in ring order
          const int dst = rank + k < world ? rank + k : rank + k - world;
          store_plain(reinterpret_cast<T*>(c.peer_base[dst] + c.layout.tiles_offset) + (1 + rank) * mn + off,
                      mine[x]);
        }
      }
      named_sync(kCommBarrier, kCommThreads);  // every push of the piece precedes the releases
      if (t < world && t != rank) store_release_sys(piece_flag(c, t, int64_t(b) * ctas + cta, rank), epoch);
      if (j > 0) sum_ranks(b - args.clusters);
    }
    if (p.all_reduce && !aborted) sum_ranks(cluster_id + (rounds - 1) * args.clusters);
  }

  __syncwarp();
  cluster_sync_all();  // no CTA leaves while a peer CTA may still read its partial or signal it
  if (p.all_reduce) store_epoch_when_last(epoch_value, epoch_value + 1, epoch);
}

// Launched as the split-K kernel's programmatic dependent.
__global__ void decode_split_k_timeout_check_kernel(const CommHandle comm) { exchange_timeout_check(comm); }

// ---------------------------------------------------------------------------------
// Host side.

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  return fn;
}

// Tensor map of a row-major [rows][cols] matrix (row pitch `ld` elements), boxes of
// 64 columns x `box_rows` rows, 128-byte swizzle; reads past the matrix give zeros.
bool encode_rows(CUtensorMap* map, const void* ptr, DType dtype, int64_t rows, int64_t cols, int64_t ld,
                 int box_rows) {
  const auto encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld) * 2};
  const cuuint32_t box[2] = {cuuint32_t(kBlockK), cuuint32_t(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                2, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

int token_tile_for(int64_t m) { return m <= 8 ? 8 : m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : 128; }

// The smallest cluster whose token slice fits kTokenBudgetBytes, and the most boxes
// per stage (4, 2, 1) that still leave kMinStages stages beside it, with the deepest
// ring that fits; cluster 0 when none fits. Bigger stages, fewer ring round trips per
// byte: 1 x H100, GEMM alone (NOTES.md, v47), K = 4096 M = 1 34.4 / 30.9 / 29.7 us for
// 1 / 2 / 4 boxes; two stages of four boxes lose (M = 32: 36.0 against 32.0 for five
// of two).
SplitGeometry geometry_for(int64_t m, int64_t k) {
  SplitGeometry g{};
  g.token_tile = token_tile_for(m);
  for (int ctas = 1; ctas <= kMaxClusterCtas; ctas *= 2) {
    for (int boxes = 4; boxes >= 1; boxes /= 2) {
      const int k_blocks = int(ceil_div(ceil_div(k, ctas), kBlockK * boxes)) * boxes;
      if (token_bytes(g.token_tile, k_blocks) > kTokenBudgetBytes) continue;
      int stages = kMaxStages;
      int smem = smem_bytes_for(g.token_tile, k_blocks, boxes, stages);
      while (stages > kMinStages && smem > kSmemLimitBytes) smem = smem_bytes_for(g.token_tile, k_blocks, boxes, --stages);
      if (smem > kSmemLimitBytes) continue;
      g.cluster = ctas;
      g.k_blocks = k_blocks;
      g.stage_boxes = boxes;
      g.stages = stages;
      g.smem_bytes = smem;
      return g;
    }
  }
  g.cluster = 0;
  return g;
}

template <typename T, int kTokens>
cudaError_t launch_with(const SplitKArgs& args_in, const SplitGeometry& g, cudaStream_t stream) {
  const auto kernel = decode_split_k_kernel<T, kTokens>;
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = g.cluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = g.smem_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  // The kernel's shared-memory limit, raised to the largest geometry launched so far on
  // this device, and the clusters resident at once (GPC boundaries may hold fewer than
  // SMs / C): asked once per device, cluster size and shared memory, since the answer
  // depends on nothing else.
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<int, int> smem_limit_by_device;
  static std::map<std::tuple<int, int, int>, int> resident_by_config;
  const std::lock_guard<std::mutex> lock(mutex);
  int& smem_limit = smem_limit_by_device[device];
  if (g.smem_bytes > smem_limit) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, g.smem_bytes);
    if (err != cudaSuccess) return err;
    smem_limit = g.smem_bytes;
  }
  int& resident = resident_by_config[{device, g.cluster, g.smem_bytes}];
  if (resident < 1) {
    config.gridDim = dim3(g.cluster * kMaxClusterCtas * 32);  // any multiple of the cluster size
    err = cudaOccupancyMaxActiveClusters(&resident, kernel, &config);
    if (err != cudaSuccess) return err;
    if (resident < 1) return cudaErrorInvalidConfiguration;
  }
  SplitKArgs args = args_in;
  const int blocks = args.p.n / kBlockN;
  args.clusters = std::min({resident, blocks, std::max(1, args.p.sm_count / g.cluster)});
  args.cluster = g.cluster;
  args.k_blocks = g.k_blocks;
  args.stage_boxes = g.stage_boxes;
  args.stages = g.stages;
  config.gridDim = dim3(args.clusters * g.cluster);
  err = cudaLaunchKernelEx(&config, kernel, args);
  if (err != cudaSuccess || !args.p.all_reduce) return err;
  return launch_kernel(decode_split_k_timeout_check_kernel, 1, 1, 0, stream, /*dependent=*/true, args.p.comm);
}

template <typename T>
cudaError_t launch_tokens(const SplitKArgs& args, const SplitGeometry& g, cudaStream_t stream) {
  switch (g.token_tile) {
    case 8: return launch_with<T, 8>(args, g, stream);
    case 16: return launch_with<T, 16>(args, g, stream);
    case 32: return launch_with<T, 32>(args, g, stream);
    case 64: return launch_with<T, 64>(args, g, stream);
    default: return launch_with<T, 128>(args, g, stream);
  }
}

}  // namespace

bool decode_split_k_shape_supported(int64_t m, int64_t n, int64_t k, bool b_transposed) {
  if (!b_transposed || m < 1 || m > 128 || n < kBlockN || n % kBlockN != 0 || k < 8 || k % 8 != 0 ||
      n > INT32_MAX || k > INT32_MAX)
    return false;
  const SplitGeometry g = geometry_for(m, k);
  return g.cluster > 0 && kMaxWorld * (1 + n / kBlockN * g.cluster) <= int64_t(kFlagsPerChannel);
}

cudaError_t launch_decode_split_k_matmul_all_reduce(const DecodeMatmulAllReduceParams& p, cudaStream_t stream) {
  if (!decode_split_k_shape_supported(p.m, p.n, p.k, p.b_transposed) || !decode_operands_valid(p))
    return cudaErrorInvalidValue;
  const SplitGeometry g = geometry_for(p.m, p.k);
  SplitKArgs args{};
  args.p = p;
  if (!encode_rows(&args.weights, p.b, p.dtype, p.n, p.k, p.ldb, kBlockN) ||
      !encode_rows(&args.tokens, p.a, p.dtype, p.m, p.k, p.lda, g.token_tile))
    return cudaErrorInvalidValue;
  return p.dtype == DType::kBFloat16 ? launch_tokens<__nv_bfloat16>(args, g, stream)
                                     : launch_tokens<__half>(args, g, stream);
}

}  // namespace distfuse
