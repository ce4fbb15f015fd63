// Persistent warp-specialized sm_90a GEMM kernel with per-tile readiness flags.
// Design, memory ordering and tile order: tile_gemm.h. Included by tile_gemm.cu only.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "kernels/allreduce/band_geometry.h"
#include "tile_gemm.h"
#include "tile_owner_exchange.cuh"
#include "tile_owner_scatter.cuh"
#include "tile_pair_exchange.cuh"

namespace distfuse {
namespace tile_gemm_detail {

// Which CTA computes which part of which tile. Tiles [0, dp_tiles) are computed
// whole, tile t by CTA t % num_ctas. The K blocks of tiles
// [dp_tiles, dp_tiles + sk_tiles), taken as one sequence of sk_iters blocks,
// are cut into num_ctas contiguous ranges, range c going to CTA c (stream-K):
//
//   sk tile:      |    0     |    1     |    2     |    3     |   (k_tiles blocks each)
//   CTA ranges:   |  c0   |  c1   |  c2   |  c3   |  c4   |  c5  |
//
// A tile covered by several ranges is a split tile: each covering CTA stores
// its partial sums in its own workspace slot (2 per CTA: the first and the
// last unit of its range) and the last to arrive adds them up.
struct TileSchedule {
  int tiles_m;
  int tiles_n;
  int group_rows;  // tile rows per group of the tile order
  int last_group_row0;  // > 0: the tile rows from this one form the order's last group
  int k_tiles;  // K blocks per tile
  int num_ctas;
  int dp_tiles;
  int sk_tiles;
  int64_t sk_iters;  // sk_tiles * k_tiles

  // (tm, tn) of tile number `tile` in the tile order (tile_gemm.h).
  __host__ __device__ void coord(int tile, int* tm, int* tn) const {
    tile_gemm_tile_coord(tile, tiles_m, tiles_n, tm, tn, group_rows, last_group_row0);
  }
  __host__ __device__ int64_t sk_range_begin(int cta) const {
    return int64_t(cta) * sk_iters / num_ctas;
  }
  // The CTA whose range holds stream-K block `iter`.
  __host__ __device__ int sk_range_owner(int64_t iter) const {
    return int(((iter + 1) * num_ctas - 1) / sk_iters);
  }
};

struct WorkUnit {
  int tile;          // number in the tile order
  int k_begin;       // first K block
  int k_count;       // K blocks (>= 1)
  int partial_slot;  // workspace slot of the partial sums of a split tile; -1 for a whole tile
  bool ends_range;   // the last unit of this CTA's stream-K range
};

// The work units of one CTA in order; the producer and the consumers each walk
// their own copy, so no scheduling state is shared between warps.
class CtaWork {
 public:
  __device__ CtaWork(const TileSchedule& schedule, int cta)
      : s_(schedule), cta_(cta), next_dp_tile_(cta) {
    sk_first_ = s_.sk_tiles > 0 ? s_.sk_range_begin(cta) : 0;
    sk_end_ = s_.sk_tiles > 0 ? s_.sk_range_begin(cta + 1) : 0;
    next_sk_iter_ = sk_first_;
  }

  __device__ bool next(WorkUnit& unit) {
    if (next_dp_tile_ < s_.dp_tiles) {
      unit = {next_dp_tile_, 0, s_.k_tiles, -1, false};
      next_dp_tile_ += s_.num_ctas;
      return true;
    }
    if (next_sk_iter_ < sk_end_) {
      const int sk_tile = int(next_sk_iter_ / s_.k_tiles);
      const int k_begin = int(next_sk_iter_ - int64_t(sk_tile) * s_.k_tiles);
      const int64_t left_in_range = sk_end_ - next_sk_iter_;
      const int k_count = int(left_in_range < s_.k_tiles - k_begin ? left_in_range
                                                                   : s_.k_tiles - k_begin);
      // Only the first and the last unit of a range can be part of a split tile.
      const int slot = k_count == s_.k_tiles ? -1 : 2 * cta_ + (next_sk_iter_ == sk_first_ ? 0 : 1);
      unit = {s_.dp_tiles + sk_tile, k_begin, k_count, slot, k_count == left_in_range};
      next_sk_iter_ += k_count;
      return true;
    }
    return false;
  }

 private:
  const TileSchedule& s_;
  int cta_;
  int next_dp_tile_;
  int64_t sk_first_, sk_end_, next_sk_iter_;
};

template <class Mainloop, class Epilogue>
struct KernelParams {
  typename Mainloop::Params mainloop;
  // Where the epilogue stores: [0] D; with an owner scatter, [p] owner p's buffer.
  typename Epilogue::Params epilogue[kMaxWorld];
  cute::Shape<int, int, int, int> problem;  // M, N, K, 1
  TileSchedule schedule;
  uint32_t* tile_flags;      // null: no flags
  uint32_t* split_counters;  // per split tile: units arrived (zero between launches)
  float* split_partials;     // 2 * num_ctas slots of tile_m * tile_n floats
  TileExchange exchange;  // output null: none (then data-parallel plans only)
  TileOwnerScatter scatter;  // world 0: none

  // Whether warps 1-3 of the producer warp group take each tile after the consumers.
  __device__ bool exchange_warps_busy() const { return exchange.output != nullptr || scatter.by_exchange_warps; }
};

// After the warp that issued the TMA stores of a tile has committed them: wait
// until they are complete (not only done reading shared memory), order them
// before generic-proxy operations, then publish with a system-scope release.
__device__ __forceinline__ void publish_tile_flag(uint32_t* flag) {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
  if (cute::elect_one_sync()) {
    add_release_sys(flag, 1);
  }
}

__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t atomic_add_acq_rel_gpu(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// kConsumerGroups_ = 1: the consumer warp groups (the TiledMma's) share each tile.
// kConsumerGroups_ = 2 (ping-pong): two consumer warp groups, each the whole TiledMma,
// take the CTA's units in turn, and one's epilogue runs under the other's MMAs:
//
//   group 0:  [mma u0]          [epi u0]▸ [mma u2]          [epi u2]▸ [mma u4] ...
//   group 1:           [mma u1]           [epi u1]▸ [mma u3]          [epi u3]▸ ...
//   producer: loads u0, u1, u2, ... into one ring; each group skips the other's stages
//
// An ordered barrier of two stages (MMA, epilogue) lets the groups' MMAs and their
// epilogues each alternate, so the tiles are still stored, flagged and published in
// the CTA in unit order (the exchange warps count them in that order). Data-parallel
// plans only: every unit is a whole tile of k_tiles blocks.
template <class Mainloop_, class Epilogue_, int kConsumerGroups_ = 1>
struct TileGemmKernel {
  using Mainloop = Mainloop_;
  using Epilogue = Epilogue_;
  using Params = KernelParams<Mainloop, Epilogue>;
  using TileShape = typename Mainloop::TileShape;
  using TiledMma = typename Mainloop::TiledMma;
  using MainloopPipeline = typename Mainloop::MainloopPipeline;
  using EpilogueLoadPipeline = typename Epilogue::LoadPipeline;
  using EpilogueStorePipeline = typename Epilogue::StorePipeline;

  static constexpr int kConsumerGroups = kConsumerGroups_;
  static constexpr bool kPingpong = kConsumerGroups == 2;
  // Threads that compute one tile (one consumer group).
  static constexpr int kMmaThreads = int(cute::size(TiledMma{}));
  static constexpr int kThreads = cutlass::NumThreadsPerWarpGroup + kConsumerGroups * kMmaThreads;
  static constexpr int kTileM = int(cute::size<0>(TileShape{}));
  static constexpr int kTileN = int(cute::size<1>(TileShape{}));
  static constexpr int kTileElems = kTileM * kTileN;
  // The producer needs few registers; the consumers hold up to a 64x256 fp32
  // slice of the tile per warp group plus the epilogue's registers.
  static constexpr uint32_t kProducerRegisters = 40;
  static constexpr uint32_t kConsumerRegisters = 232;
  // Named barriers of the consumer warp groups for the split-tile reduction and of
  // the exchange warps; user ids start after the ones CUTLASS's collectives reserve.
  static constexpr uint32_t kSplitBarrier = 0;
  static constexpr uint32_t kExchangeBarrier = 1;
  static constexpr uint32_t kConsumerExchangeBarrier = 2;
  static_assert(!kPingpong || kMmaThreads == cutlass::NumThreadsPerWarpGroup, "ping-pong: a warp group per tile");
  // Ping-pong: stage 0 orders the groups' MMAs, stage 1 their epilogues.
  using MathOrderBarrier = cutlass::OrderedSequenceBarrier<2, 2>;
  // The exchange's element type (cuda_fp16 / cuda_bf16 types of the same layout).
  using ExchangeElement = std::conditional_t<std::is_same_v<typename Mainloop::ElementA, cutlass::half_t>,
                                             __half, __nv_bfloat16>;
  // Threads of the exchanges that cover one tile row, a 16-byte vector each.
  static constexpr int kExchangeLanesPerRow = kTileN / Pack<ExchangeElement, 16>::kElems;

  struct SharedStorage {
    // Swizzled TMA buffers: 1024-byte alignment keeps the swizzle pattern on
    // the addresses the collectives assume.
    alignas(1024) typename Mainloop::TensorStorage mainloop;
    alignas(1024) typename Epilogue::TensorStorage epilogue;
    alignas(16) typename Mainloop::PipelineStorage mainloop_pipeline;
    alignas(16) typename Epilogue::PipelineStorage epilogue_load_pipeline;
    alignas(16) typename MathOrderBarrier::SharedStorage math_order;
    // Broadcasts of the split-tile reduction: two words, so that each is
    // rewritten only after a barrier that every reader of its last value passed.
    uint32_t split_others_arrived;
    uint32_t split_is_last;
    ExchangeCtaState exchange;
    alignas(16) uint4 exchange_staging[kExchangeStagingBytes / 16];
  };

  static_assert(kThreads == 256 || kThreads == 384, "1 producer + 1 or 2 consumer warp groups");

  __device__ void operator()(const Params& params, char* smem) const {
    using namespace cute;
    SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem);
    const int thread_idx = int(threadIdx.x);
    const bool is_producer = cutlass::canonical_warp_group_idx() == 0;
    const int warp_in_group = cutlass::canonical_warp_idx_sync() % cutlass::NumWarpsPerWarpGroup;

    if (thread_idx == 0) {
      Mainloop::prefetch_tma_descriptors(params.mainloop);
      for (int p = 0; p < (params.scatter.by_epilogue() ? params.scatter.world : 1); ++p)
        Epilogue::prefetch_tma_descriptors(params.epilogue[p]);
      shared.exchange.published = 0;
      shared.exchange.aborted = 0;
      shared.exchange.tail_aborted = 0;
      if (params.exchange.output != nullptr) {
        exchange_trace(params.exchange.comm, kTraceKernelStart);
        // The timeout check after this kernel is its programmatic dependent: let it launch
        // now and wait (griddepcontrol.wait) for this grid's end, so that no launch gap
        // follows the last CTA.
        asm volatile("griddepcontrol.launch_dependents;");
        shared.exchange.epoch = next_epoch(*call_epoch(params.exchange.comm).value);
        // This CTA's tiles are blockIdx.x, + gridDim.x, ... below dp_tiles; the last one
        // is the consumers' when they take it. (Computed here: a division costs the
        // exchange warps' 40 registers spills.)
        const int dp = params.schedule.dp_tiles, cta = int(blockIdx.x), ctas = int(gridDim.x);
        shared.exchange.tiles_end = params.exchange.last_tile_in_consumers ? cta + (dp - 1 - cta) / ctas * ctas : dp;
      }
    }

    typename MainloopPipeline::Params mainloop_pipeline_params;
    mainloop_pipeline_params.role =
        !is_producer        ? MainloopPipeline::ThreadCategory::Consumer
        : warp_in_group == 0 ? MainloopPipeline::ThreadCategory::Producer
                             : MainloopPipeline::ThreadCategory::NonParticipant;
    mainloop_pipeline_params.is_leader = thread_idx == 0;
    mainloop_pipeline_params.num_consumers = kMmaThreads;
    mainloop_pipeline_params.num_producers = Mainloop::NumProducerThreadEvents;
    mainloop_pipeline_params.transaction_bytes = params.mainloop.tma_transaction_bytes;
    MainloopPipeline mainloop_pipeline(shared.mainloop_pipeline, mainloop_pipeline_params,
                                       Shape<_1, _1, _1>{});

    // D = acc has no source operand: the epilogue's load pipeline is never
    // filled but its store() takes one.
    typename EpilogueLoadPipeline::Params epilogue_load_params;
    epilogue_load_params.role = is_producer ? EpilogueLoadPipeline::ThreadCategory::NonParticipant
                                            : EpilogueLoadPipeline::ThreadCategory::Consumer;
    epilogue_load_params.dst_blockid = 0;
    epilogue_load_params.producer_arv_count = cutlass::NumThreadsPerWarp;
    epilogue_load_params.consumer_arv_count = kMmaThreads;
    epilogue_load_params.transaction_bytes = params.epilogue[0].tma_transaction_bytes;
    EpilogueLoadPipeline epilogue_load_pipeline(shared.epilogue_load_pipeline, epilogue_load_params);

    typename EpilogueStorePipeline::Params epilogue_store_params;
    epilogue_store_params.always_wait = true;
    EpilogueStorePipeline epilogue_store_pipeline(epilogue_store_params);

    typename MathOrderBarrier::Params math_order_params;
    math_order_params.group_id = is_producer ? 0 : uint32_t(cutlass::canonical_warp_group_idx() - 1);
    math_order_params.group_size = kMmaThreads;
    MathOrderBarrier math_order(shared.math_order, math_order_params);

    __syncthreads();  // barrier initialization visible to every warp

    Mainloop mainloop;
    CtaWork work(params.schedule, int(blockIdx.x));
    WorkUnit unit;

    if (is_producer) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegisters>();
      if (warp_in_group != 0) {
        if (params.exchange.output != nullptr) exchange_tiles(params, shared, thread_idx - cutlass::NumThreadsPerWarp);
        else if (params.scatter.by_exchange_warps) scatter_tiles(params, shared, thread_idx - cutlass::NumThreadsPerWarp);
        return;
      }
      auto load_inputs = mainloop.load_init(params.problem, params.mainloop);
      auto k_tile_shape = shape<3>(get<0>(load_inputs));
      auto write_state = cutlass::make_producer_start_state<MainloopPipeline>();
      while (work.next(unit)) {
        int tm, tn;
        params.schedule.coord(unit.tile, &tm, &tn);
        auto k_tile_iter = make_coord_iterator(idx2crd(unit.k_begin, k_tile_shape), k_tile_shape);
        mainloop.load(params.mainloop, mainloop_pipeline, write_state, load_inputs,
                      make_coord(tm, tn, _, 0), k_tile_iter, unit.k_count,
                      cutlass::canonical_lane_idx(), 0u, shared.mainloop);
        write_state.advance(unit.k_count);
      }
      mainloop.load_tail(mainloop_pipeline, write_state);
      return;
    }

    cutlass::arch::warpgroup_reg_alloc<kConsumerRegisters>();
    if constexpr (kPingpong) {
      const int consumer_thread = thread_idx - cutlass::NumThreadsPerWarpGroup;
      consume_in_turns(params, shared, mainloop, mainloop_pipeline, epilogue_load_pipeline,
                       epilogue_store_pipeline, math_order, work, consumer_thread / kMmaThreads,
                       consumer_thread % kMmaThreads);
      return;
    }
    const int mma_thread_idx = thread_idx - cutlass::NumThreadsPerWarpGroup;
    TiledMma tiled_mma;
    Epilogue epilogue(params.epilogue[0], shared.epilogue);
    typename Mainloop::PipelineState read_state;
    typename Epilogue::LoadPipelineState epilogue_load_state;
    auto epilogue_store_state = cutlass::make_producer_start_state<EpilogueStorePipeline>();
    bool stored_any_tile = false;
    uint32_t tiles_stored = 0;
    int last_tile = -1;
    // Owner scatter: the flag of the tile stored last, published before the next
    // tile's stores (its stores to a peer had this tile's MMAs to land).
    uint32_t* unpublished_flag = nullptr;

    while (work.next(unit)) {
      auto accum = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));
      mainloop.mma(mainloop_pipeline, read_state, accum, unit.k_count, mma_thread_idx,
                   shared.mainloop, params.mainloop);
      mainloop.mma_tail(mainloop_pipeline, read_state, unit.k_count);
      if (params.exchange.output != nullptr && mma_thread_idx == 0) exchange_trace(params.exchange.comm, kTraceMmaDone);
      read_state.advance(unit.k_count);

      if (unit.partial_slot >= 0 &&
          !reduce_split_tile(params, unit, accum, mma_thread_idx, shared)) {
        continue;  // another CTA finishes this tile
      }

      int tm, tn;
      params.schedule.coord(unit.tile, &tm, &tn);
      const int flag_index = tm * params.schedule.tiles_n + tn;
      int owner = 0;
      if (params.scatter.by_epilogue()) {  // the epilogue's TMA stores go to the tile's owner
        owner = scatter_owner_of_tile_row(tm, params.schedule.tiles_m, params.scatter.band_tile_rows,
                                          params.scatter.world);
        if (unpublished_flag != nullptr && mma_thread_idx < cutlass::NumThreadsPerWarp)
          publish_tile_flag(unpublished_flag);
      }
      auto [load_state_next, store_state_next] = Epilogue(params.epilogue[owner], shared.epilogue).store(
          epilogue_load_pipeline, epilogue_load_state, epilogue_store_pipeline,
          epilogue_store_state, params.problem, TileShape{}, make_coord(tm, tn, _, 0), accum,
          tiled_mma, mma_thread_idx, shared.epilogue);
      epilogue_load_state = load_state_next;
      epilogue_store_state = store_state_next;
      stored_any_tile = true;
      last_tile = unit.tile;

      // Consumer warp 0 issued and committed the tile's TMA stores.
      ++tiles_stored;
      if (params.scatter.by_epilogue()) {
        unpublished_flag = params.scatter.owner_flags[owner] + flag_index;
      } else if (mma_thread_idx < cutlass::NumThreadsPerWarp) {
        publish_stored_tile(params, shared, tm, tn, tiles_stored);
      }
    }
    if (unpublished_flag != nullptr && mma_thread_idx < cutlass::NumThreadsPerWarp)
      publish_tile_flag(unpublished_flag);
    if (stored_any_tile) {
      epilogue.store_tail(epilogue_load_pipeline, epilogue_load_state, epilogue_store_pipeline,
                          epilogue_store_state);
    }
    if (params.exchange.output != nullptr && params.exchange.last_tile_in_consumers && last_tile >= 0) {
      // Consumer warp 0 published the tile (its stores complete); the barrier inside
      // orders that before every consumer's loads of it.
      exchange_last_tile_in_consumers<ExchangeElement, kTileM, kExchangeLanesPerRow, kMmaThreads>(
          params.exchange, get<0>(params.problem), get<1>(params.problem), last_tile, &shared.exchange,
          mma_thread_idx, exchange_tile_coord(params.schedule),
          [] { cutlass::arch::NamedBarrier::sync(kMmaThreads, kConsumerExchangeBarrier); });
    }
  }

  // Consumer warp 0 of a group, after the group's epilogue issued and committed the TMA
  // stores of tile (tm, tn), the CTA's `count`-th: the tile's flag, and its publication to
  // the exchange warps.
  __device__ static void publish_stored_tile(const Params& params, SharedStorage& shared, int tm, int tn,
                                             uint32_t count) {
    if (params.tile_flags != nullptr) publish_tile_flag(params.tile_flags + tm * params.schedule.tiles_n + tn);
    if (params.exchange_warps_busy()) {
      publish_tile_in_cta(&shared.exchange, count);
      if (params.exchange.output != nullptr && threadIdx.x % cutlass::NumThreadsPerWarpGroup == 0)
        exchange_trace(params.exchange.comm, kTracePublished);
    }
  }

  // Ping-pong consumers: group `group` (0 or 1) takes the CTA's units group, group + 2, ...
  // (the diagram above TileGemmKernel); mma_thread_idx is the thread's index in its group.
  __device__ static void consume_in_turns(const Params& params, SharedStorage& shared, Mainloop& mainloop,
                                          MainloopPipeline& mainloop_pipeline,
                                          EpilogueLoadPipeline& epilogue_load_pipeline,
                                          EpilogueStorePipeline& epilogue_store_pipeline,
                                          MathOrderBarrier& order, CtaWork& work, int group, int mma_thread_idx) {
    using namespace cute;
    TiledMma tiled_mma;
    Epilogue epilogue(params.epilogue[0], shared.epilogue);
    typename Mainloop::PipelineState read_state;
    typename Epilogue::LoadPipelineState epilogue_load_state;
    auto epilogue_store_state = cutlass::make_producer_start_state<EpilogueStorePipeline>();
    constexpr auto kLoadIncrement = Epilogue::get_load_pipe_increment(TileShape{});
    constexpr auto kStoreIncrement = Epilogue::get_store_pipe_increment(TileShape{});
    const int k_tiles = params.schedule.k_tiles;  // every unit's: whole tiles only
    const bool leader_warp = mma_thread_idx < cutlass::NumThreadsPerWarp;
    WorkUnit unit;
    uint32_t unit_number = 0;  // of the CTA's last unit taken (by either group), from 1
    if (group == 1) {         // start past group 0's first unit and its pipeline stages
      if (work.next(unit)) ++unit_number;
      read_state.advance(k_tiles);
      epilogue_load_state.advance(kLoadIncrement);
      epilogue_store_state.advance(kStoreIncrement);
    }
    while (work.next(unit)) {
      ++unit_number;
      const int tile = unit.tile;
      auto accum = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));
      order.wait();
      mainloop.mma(mainloop_pipeline, read_state, accum, k_tiles, mma_thread_idx, shared.mainloop,
                   params.mainloop);
      order.arrive();
      mainloop.mma_tail(mainloop_pipeline, read_state, k_tiles);
      read_state.advance(2 * k_tiles);  // this unit's stages and the other group's next unit's
      if (params.exchange.output != nullptr && mma_thread_idx == 0) exchange_trace(params.exchange.comm, kTraceMmaDone);

      int tm, tn;
      params.schedule.coord(tile, &tm, &tn);
      order.wait();
      auto [load_state, store_state] = epilogue.store(
          epilogue_load_pipeline, epilogue_load_state, epilogue_store_pipeline, epilogue_store_state,
          params.problem, TileShape{}, make_coord(tm, tn, _, 0), accum, tiled_mma, mma_thread_idx,
          shared.epilogue);
      // The other group's epilogue reuses the shared memory these stores read from.
      auto [load_state_tail, store_state_tail] =
          epilogue.store_tail(epilogue_load_pipeline, load_state, epilogue_store_pipeline, store_state);
      epilogue_load_state = load_state_tail;
      epilogue_store_state = store_state_tail;
      epilogue_load_state.advance(kLoadIncrement);
      epilogue_store_state.advance(kStoreIncrement);
      // Inside the epilogue's turn, so that the CTA publishes its tiles in unit order.
      if (leader_warp) publish_stored_tile(params, shared, tm, tn, unit_number);
      order.arrive();
      if (!work.next(unit)) break;  // the other group's
      ++unit_number;
    }
    if (params.exchange.output != nullptr && params.exchange.last_tile_in_consumers) {
      // Both groups take the CTA's last tile (tiles_end), the one that stored it and the
      // one already done: the tile in flight from twice the threads. The stores' group
      // published it (stores complete); the barrier inside orders that before every load.
      constexpr int kConsumerThreads = kConsumerGroups * kMmaThreads;
      exchange_last_tile_in_consumers<ExchangeElement, kTileM, kExchangeLanesPerRow, kConsumerThreads>(
          params.exchange, get<0>(params.problem), get<1>(params.problem), shared.exchange.tiles_end,
          &shared.exchange, group * kMmaThreads + mma_thread_idx, exchange_tile_coord(params.schedule),
          [] { cutlass::arch::NamedBarrier::sync(kConsumerThreads, kConsumerExchangeBarrier); });
    }
  }

  // tile number -> (flag index, first row, first column) of the tile in D.
  __device__ static auto exchange_tile_coord(const TileSchedule& s) {
    return [&s](int tile, int* t, int64_t* row0, int64_t* col0) {
      int tm, tn;
      s.coord(tile, &tm, &tn);
      *t = tm * s.tiles_n + tn;
      *row0 = int64_t(tm) * kTileM;
      *col0 = int64_t(tn) * kTileN;
    };
  }

  // The exchange warps (tile_pair_exchange.cuh, tile_owner_exchange.cuh): every
  // tile of this CTA, as the consumers store it. Data-parallel plans only, so every
  // rank's CTA c takes the same tiles in the same order.
  __device__ static void exchange_tiles(const Params& params, SharedStorage& shared, int x) {
    using namespace cute;
    const TileSchedule& s = params.schedule;
    const auto tile_coord = exchange_tile_coord(s);
    auto sync = [] { cutlass::arch::NamedBarrier::sync(kExchangeThreads, kExchangeBarrier); };
    if (params.exchange.through_owners) {
      exchange_tiles_through_owners<ExchangeElement, kTileM, kExchangeLanesPerRow>(
          params.exchange, get<0>(params.problem), get<1>(params.problem), s.dp_tiles, &shared.exchange,
          shared.exchange_staging, x, tile_coord, sync);
    } else {
      exchange_tiles_with_peer<ExchangeElement, kTileM, kExchangeLanesPerRow>(
          params.exchange, get<0>(params.problem), get<1>(params.problem), shared.exchange.tiles_end,
          &shared.exchange, shared.exchange_staging, x, tile_coord, sync);
    }
  }

  // The exchange warps' owner scatter (tile_owner_scatter.cuh): every tile of this CTA, as
  // the consumers store it into D.
  __device__ static void scatter_tiles(const Params& params, SharedStorage& shared, int x) {
    using namespace cute;
    const TileSchedule& s = params.schedule;
    scatter_tiles_to_owners<ExchangeElement, kTileM, kExchangeLanesPerRow>(
        params.scatter, get<0>(params.problem), get<1>(params.problem), s.dp_tiles, &shared.exchange,
        shared.exchange_staging, x, exchange_tile_coord(s),
        [] { cutlass::arch::NamedBarrier::sync(kExchangeThreads, kExchangeBarrier); });
  }

  // Split tile: store this unit's partial sums, arrive on the tile's counter.
  // Returns true in the last arriving CTA, with `accum` then holding the sum
  // of all partials, added in K order so that the result does not depend on
  // which CTA arrived last.
  template <class Accumulators>
  __device__ static bool reduce_split_tile(const Params& params, const WorkUnit& unit,
                                           Accumulators& accum, int mma_thread_idx,
                                           SharedStorage& shared) {
    constexpr int kVectors = int(cute::size(Accumulators{})) / 4;
    // float4 loads in flight per pass (64 registers): each pass costs one L2
    // round trip per contributing CTA, at the end of the kernel.
    constexpr int kVectorsPerPass = kVectors <= 16 ? kVectors : 16;
    static_assert(kVectors * 4 * kMmaThreads == kTileElems, "fragment must cover the tile");
    static_assert(kVectors % kVectorsPerPass == 0, "passes must cover the fragment");
    const TileSchedule& s = params.schedule;
    // Slot layout [vector][thread]: each warp stores 512 contiguous bytes.
    auto slot_at = [&](int slot) {
      return reinterpret_cast<float4*>(params.split_partials) + int64_t(slot) * (kTileElems / 4) +
             mma_thread_idx;
    };

    const int sk_tile = unit.tile - s.dp_tiles;
    const int64_t first_iter = int64_t(sk_tile) * s.k_tiles;
    const int first_cta = s.sk_range_owner(first_iter);
    const int last_cta = s.sk_range_owner(first_iter + s.k_tiles - 1);
    const uint32_t other_units = uint32_t(last_cta - first_cta);
    uint32_t* counter = params.split_counters + sk_tile;

    // The unit that ends a CTA's range usually completes its tile last: when
    // every other unit has already arrived it is the last one without arriving.
    if (unit.ends_range) {
      if (mma_thread_idx == 0) {
        shared.split_others_arrived = load_acquire_gpu(counter) == other_units;
      }
      cutlass::arch::NamedBarrier::sync(kMmaThreads, kSplitBarrier);
    }
    const bool known_last = unit.ends_range && shared.split_others_arrived;

    // The sum below reads every partial from the workspace, this unit's too
    // (each thread reads back only what it stored), so store it even when known last.
    float4* own = slot_at(unit.partial_slot);
    CUTLASS_PRAGMA_UNROLL
    for (int v = 0; v < kVectors; ++v) {
      __stcg(own + v * kMmaThreads,
             make_float4(accum(4 * v), accum(4 * v + 1), accum(4 * v + 2), accum(4 * v + 3)));
    }

    if (!known_last) {
      // The barrier orders every consumer thread's partial stores before the
      // release of the arrival; the acquire of the last arriver plus the
      // second barrier orders the other CTAs' partials before our loads.
      cutlass::arch::NamedBarrier::sync(kMmaThreads, kSplitBarrier);
      if (mma_thread_idx == 0) {
        shared.split_is_last = atomic_add_acq_rel_gpu(counter, 1) == other_units;
      }
      cutlass::arch::NamedBarrier::sync(kMmaThreads, kSplitBarrier);
      if (!shared.split_is_last) return false;
    }
    // Every unit of the tile has arrived: ready for the next launch.
    if (mma_thread_idx == 0) *counter = 0;

    // The tile is the first unit of CTA `cta` unless its range began in an earlier tile.
    auto partials_of = [&](int cta) {
      return slot_at(2 * cta + (s.sk_range_begin(cta) >= first_iter ? 0 : 1));
    };
    CUTLASS_PRAGMA_UNROLL
    for (int pass = 0; pass < kVectors; pass += kVectorsPerPass) {
      const float4* first = partials_of(first_cta);
      CUTLASS_PRAGMA_UNROLL
      for (int v = pass; v < pass + kVectorsPerPass; ++v) {
        const float4 part = __ldcg(first + v * kMmaThreads);
        accum(4 * v) = part.x;
        accum(4 * v + 1) = part.y;
        accum(4 * v + 2) = part.z;
        accum(4 * v + 3) = part.w;
      }
      for (int cta = first_cta + 1; cta <= last_cta; ++cta) {
        const float4* partials = partials_of(cta);
        CUTLASS_PRAGMA_UNROLL
        for (int v = pass; v < pass + kVectorsPerPass; ++v) {
          const float4 part = __ldcg(partials + v * kMmaThreads);
          accum(4 * v) += part.x;
          accum(4 * v + 1) += part.y;
          accum(4 * v + 2) += part.z;
          accum(4 * v + 3) += part.w;
        }
      }
    }
    return true;
  }
};

template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, 1)
    tile_gemm_kernel(const __grid_constant__ typename Kernel::Params params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ char smem[];
  Kernel{}(params, smem);
#else
  __trap();  // wgmma and TMA need sm_90a
#endif
}

}  // namespace tile_gemm_detail
}  // namespace distfuse
