// Band all-reduce of GEMM outputs; the schedule is drawn in band_all_reduce.h.
#include "kernels/allreduce/band_all_reduce.h"

#include "distfuse/comm/signal.cuh"
#include "kernels/allreduce/rank_order_sum.cuh"
#include "kernels/common/vec.cuh"

namespace distfuse {
namespace {

constexpr int kReduceThreads = 512;
constexpr int kSignalThreads = 32;  // one per peer (W <= kMaxWorld)
constexpr int kWaitThreads = 512;   // one tile per thread and round

template <int W>
constexpr int kReduceUnroll = W <= 2 ? 4 : W <= 4 ? 2 : 1;

// counters(kChannelBands): [0] the last finished call's epoch, [1 + band] CTAs of
// band's reduce that finished (the last one resets it).
__device__ __forceinline__ uint32_t* epoch_counter(const CommHandle& c) { return c.counters(kChannelBands); }
__device__ __forceinline__ uint32_t* reduce_done_counter(const CommHandle& c, int band) {
  return c.counters(kChannelBands) + 1 + band;
}
__device__ __forceinline__ uint32_t call_epoch(const CommHandle& c) { return next_epoch(*epoch_counter(c)); }
// kChannelBands flags [kEntrySlot, + W): the copy-engine schedule's entry handshake.
constexpr int64_t kEntrySlot = 2ll * kMaxBands * kMaxWorld;
static_assert(kEntrySlot + kMaxWorld <= int64_t(kFlagsPerChannel), "band flags overflow the channel");

// Flags on rank `dst` written by rank `src`: its partial of band landed in recv_dst[src];
// its sum of its shard of band is in red_src.
__device__ __forceinline__ uint32_t* landed_flag(const CommHandle& c, int dst, int band, int src) {
  return c.flags(dst, kChannelBands) + int64_t(band) * kMaxWorld + src;
}
__device__ __forceinline__ uint32_t* reduced_flag(const CommHandle& c, int dst, int band, int src) {
  return c.flags(dst, kChannelBands) + int64_t(kMaxBands + band) * kMaxWorld + src;
}

// Threads 0..W-1 but `skip` wait until flag(src) reached the epoch; then the
// CTA moves on together (the acquires make the flagged data visible to the CTA).
template <typename Flag>
__device__ __forceinline__ void wait_band_flags(const CommHandle& c, int band, uint32_t epoch, int skip,
                                                Flag flag) {
  if (int(threadIdx.x) < c.world && int(threadIdx.x) != skip)
    wait_flag_reached(flag(int(threadIdx.x)), epoch, c.timeout_ns, kOpMatmulAllReduce, "band", band,
                      threadIdx.x);
  __syncthreads();
}

// The GEMM tiles of `band`: bands are whole tile rows, so their tile indices (row-major
// over the tile grid) are one run.
__device__ __forceinline__ RowRange band_tiles(const BandAllReduceParams& p, int band) {
  const RowRange b = band_rows_of(p, band);
  const int64_t tiles_n = (p.n + p.tile_n - 1) / p.tile_n;
  const int64_t tm0 = b.row0 / p.tile_m, tm1 = (b.row0 + b.rows + p.tile_m - 1) / p.tile_m;
  return {tm0 * tiles_n, (tm1 - tm0) * tiles_n};
}

// The tile flags (kChannelTiles slots of this rank, and their seen counters) that a
// band's sum waits for: this rank's tiles of the band, or, with scattered tiles, every
// rank's tiles of this rank's shard of it (rank src's tile t at slot src·T + t, T the
// tiles of D).
struct BandTileSlots {
  int64_t first, count;    // tiles t of one source: first .. first + count - 1
  int64_t sources, stride;  // sources, and the slots between two sources' tile t
  __device__ int64_t size() const { return count * sources; }
  __device__ int64_t slot(int64_t i) const { return first + i % count + i / count * stride; }
  // The tile and the source rank of the i-th slot.
  __device__ int tile(int64_t i) const { return int(first + i % count); }
  __device__ int source(int64_t i, int rank) const { return sources == 1 ? rank : int(i / count); }
};
__device__ __forceinline__ BandTileSlots band_tile_slots(const BandAllReduceParams& p, int band) {
  if (!p.tiles_scattered) {
    const RowRange t = band_tiles(p, band);
    return {t.row0, t.rows, 1, 0};
  }
  const int64_t tiles_n = (p.n + p.tile_n - 1) / p.tile_n, tiles_m = (p.m + p.tile_m - 1) / p.tile_m;
  const RowRange s = band_shard(p, band, p.comm.rank);
  // An empty shard (the last band may have fewer tile rows than ranks) waits for no tile.
  const int64_t tm0 = s.row0 / p.tile_m, tm1 = s.rows > 0 ? (s.row0 + s.rows + p.tile_m - 1) / p.tile_m : tm0;
  return {tm0 * tiles_n, (tm1 - tm0) * tiles_n, p.comm.world, tiles_m * tiles_n};
}

// Waits until the band's tiles (band_tile_slots) are published in this call (the GEMM
// bumps each slot once per call; seen[slot] counts the calls consumed, shared with the
// tile consumers; `consume`: count this call as consumed for them, else the caller
// does it later).
__device__ void wait_band_tiles(const BandAllReduceParams& p, int band, bool consume) {
  const CommHandle& c = p.comm;
  const BandTileSlots slots = band_tile_slots(p, band);
  const uint32_t* ready = c.flags(c.rank, kChannelTiles);
  uint32_t* seen = c.tile_seen();
  for (int64_t i = threadIdx.x; i < slots.size(); i += blockDim.x) {
    const int64_t t = slots.slot(i);
    const uint32_t expected = seen[t] + 1;
    wait_flag_reached(ready + t, expected, c.timeout_ns, kOpMatmulAllReduce, "tile", slots.tile(i),
                      slots.source(i, c.rank));
    if (consume) seen[t] = expected;
  }
}

// Band 0 also makes the call's entry handshake (band_all_reduce.h): the copies
// that follow on this stream write into peers' workspace.
__global__ void __launch_bounds__(kWaitThreads) band_wait_ready_kernel(BandAllReduceParams p, int band) {
  if (band == 0) enter_call(p.comm, kChannelBands, kEntrySlot, call_epoch(p.comm), kOpMatmulAllReduce);
  wait_band_tiles(p, band, /*consume=*/true);
}

// After this rank's copies of the band (earlier on the stream) completed: tell
// every owner that its shard landed.
__global__ void __launch_bounds__(kSignalThreads) band_signal_landed_kernel(BandAllReduceParams p, int band) {
  const CommHandle& c = p.comm;
  const int k = int(threadIdx.x) + 1;
  if (k >= c.world) return;
  __threadfence_system();  // the copies are complete; order them before the flag for every observer
  store_release_sys(landed_flag(c, (c.rank + k) % c.world, band, c.rank), call_epoch(c));
}

// Σ in rank order (+ bias) of this rank's shard of the band, once every peer's
// partial landed: to the output and to red (which the peers pull); the last CTA
// to finish tells every peer.
template <typename T, int W>
__global__ void __launch_bounds__(kReduceThreads) band_reduce_kernel(BandAllReduceParams p, int band) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int U = kReduceUnroll<W>;
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  const uint32_t epoch = call_epoch(c);
  wait_band_flags(c, band, epoch, rank, [&](int src) { return landed_flag(c, rank, band, src); });

  const RowRange shard = band_shard(p, band, rank);
  const int64_t off0 = shard.row0 * p.n;
  const int64_t count = shard.rows * p.n / kVec;
  const T* base = static_cast<const T*>(band_region(p, rank, 0));
  T* red = static_cast<T*>(band_region(p, rank, band_slot_offset(p, rank)));
  T* out = static_cast<T*>(p.output);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t stride = int64_t(gridDim.x) * U * kReduceThreads;
  for (int64_t v0 = int64_t(blockIdx.x) * U * kReduceThreads + threadIdx.x; v0 < count; v0 += stride)
    sum_batch_in_rank_order<T, W, U, kReduceThreads>(
        v0, count,
        [&](int src, int64_t v) {
          return base + (src == rank ? 0 : band_slot_offset(p, src)) + off0 + v * kVec;
        },
        bias, [&](int64_t v) { return (off0 + v * kVec) % p.n; },
        [&](int64_t v, uint4 r) {
          store_plain(out + off0 + v * kVec, r);
          store_plain(red + off0 + v * kVec, r);
        });

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this CTA's sums precede its arrival
    uint32_t* done = reduce_done_counter(c, band);
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0;
      __threadfence_system();  // every CTA's sums (seen through the counter) precede the flags
      for (int k = 1; k < W; ++k) store_release_sys(reduced_flag(c, (rank + k) % W, band, rank), epoch);
    }
  }
}

// Waits for every peer's sum of its shard of the band; the last band's wait is
// the call's last reader of the epoch and stores it.
__global__ void __launch_bounds__(kSignalThreads)
    band_wait_reduced_kernel(BandAllReduceParams p, int band, bool last) {
  const CommHandle& c = p.comm;
  const uint32_t epoch = call_epoch(c);
  const int k = int(threadIdx.x) + 1;
  if (k < c.world) {
    const int src = (c.rank + k) % c.world;
    wait_flag_reached(reduced_flag(c, c.rank, band, src), epoch, c.timeout_ns, kOpMatmulAllReduce, "band",
                      band, src);
  }
  if (last) {
    __syncthreads();
    if (threadIdx.x == 0) *epoch_counter(c) = epoch;
  }
}

// ------------------------------------------------------------ SM-pull schedule

// counters(kChannelBandPull): [0] the last finished call's epoch (kernel per band) or
// last band number (persistent kernel, lane 0): both only grow, so the two kernels can
// follow each other; [1] CTAs of the running band kernel done summing; [2] CTAs of the
// call's last kernel (lane 0) done; [3], [4]: [0] and [2] of the persistent kernel's
// lane 1 (the tail kernel).
__device__ __forceinline__ uint32_t* pull_counter(const CommHandle& c, int i) {
  return c.counters(kChannelBandPull) + i;
}
// Flags on rank `dst` written by rank `src`: src's D rows of the band are complete;
// src's sums of its shard of the band are in its own slot (red_src).
__device__ __forceinline__ uint32_t* pull_ready_flag(const CommHandle& c, int dst, int band, int src) {
  return c.flags(dst, kChannelBandPull) + int64_t(band) * kMaxWorld + src;
}
__device__ __forceinline__ uint32_t* pull_summed_flag(const CommHandle& c, int dst, int band, int src) {
  return c.flags(dst, kChannelBandPull) + int64_t(kMaxBands + band) * kMaxWorld + src;
}

constexpr int kPullUnroll = 8;  // 16-byte loads in flight per thread: NVLink needs ~1 MB per GPU

// The 16-byte vectors first + u·kReduceThreads (u < kPullUnroll), then the same
// `stride` further on, ... < end, of one thread: copied from `from` to `to`.
template <typename T>
__device__ __forceinline__ void pull_vectors(const T* from, T* to, int64_t first, int64_t end, int64_t stride) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = kPullUnroll;
  for (int64_t v0 = first; v0 < end; v0 += stride) {
    uint4 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v0 + u * kReduceThreads < end) x[u] = load_cg(from + (v0 + u * kReduceThreads) * kVec);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v0 + u * kReduceThreads < end) store_plain(to + (v0 + u * kReduceThreads) * kVec, x[u]);
  }
}

// Peer src's sums of its shard of `band` (in its red slot) and where they go in the output.
template <typename T>
struct PeerSums {
  const T* from;
  T* to;
  int64_t vectors;
};
template <typename T>
__device__ __forceinline__ PeerSums<T> peer_sums(const BandAllReduceParams& p, int band, int src) {
  const RowRange s = band_shard(p, band, src);
  const int64_t off = s.row0 * p.n;
  return {static_cast<const T*>(band_region(p, src, band_slot_offset(p, src) + off)),
          static_cast<T*>(p.output) + off, s.rows * p.n / (16 / int64_t(sizeof(T)))};
}

// Every peer's sums of its shard of `band`, pulled from its red slot into the output.
template <typename T, int W>
__device__ void gather_peer_sums(const BandAllReduceParams& p, int band, uint32_t epoch) {
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  wait_band_flags(c, band, epoch, rank, [&](int src) { return pull_summed_flag(c, rank, band, src); });
  for (int k = 1; k < W; ++k) {
    const PeerSums<T> s = peer_sums<T>(p, band, rank + k < W ? rank + k : rank + k - W);
    pull_vectors(s.from, s.to, int64_t(blockIdx.x) * kPullUnroll * kReduceThreads + threadIdx.x, s.vectors,
                 int64_t(gridDim.x) * kPullUnroll * kReduceThreads);
  }
}

// Σ in rank order (+ bias) of this rank's shard of `band`, vectors first, first +
// stride, ... < end of one thread (U per step), every rank's rows loaded from its D
// (peers' over NVLink): to the output and to red_r.
template <typename T, int W>
__device__ void sum_shard_vectors(const BandAllReduceParams& p, int band, int64_t first, int64_t end,
                                  int64_t stride) {
  constexpr int kVec = 16 / sizeof(T);
  const int rank = p.comm.rank;
  const int64_t off0 = band_shard(p, band, rank).row0 * p.n;
  T* out = static_cast<T*>(p.output) + off0;
  T* red = static_cast<T*>(band_region(p, rank, band_slot_offset(p, rank) + off0));
  const T* rows_of[W];  // every rank's partial of this shard: its D (scattered: landed here)
#pragma unroll
  for (int k = 0; k < W; ++k)
    rows_of[k] = static_cast<const T*>(
        p.tiles_scattered ? band_region(p, rank, scattered_partial_offset(p, k, rank) + off0)
                          : band_region(p, k, off0));
  for (int64_t v0 = first; v0 < end; v0 += stride)
    sum_batch_in_rank_order<T, W, kReduceUnroll<W>, kReduceThreads>(
        v0, end, [&](int src, int64_t v) { return rows_of[src] + v * kVec; }, static_cast<const T*>(p.bias),
        [&](int64_t v) { return (off0 + v * kVec) % p.n; },
        [&](int64_t v, uint4 r) {
          store_plain(out + v * kVec, r);
          store_plain(red + v * kVec, r);
        });
}
template <typename T>
__device__ __forceinline__ int64_t shard_vectors(const BandAllReduceParams& p, int band, int owner) {
  return band_shard(p, band, owner).rows * p.n / (16 / int64_t(sizeof(T)));
}

// This rank's shard of `band`: once every rank's rows are complete, Σ in rank order
// (+ bias) of every rank's rows (peers' over NVLink) to the output and to red_r; the
// last CTA done tells every peer.
template <typename T, int W>
__device__ void sum_own_shard(const BandAllReduceParams& p, int band, uint32_t epoch) {
  const CommHandle& c = p.comm;
  const int rank = c.rank;
  if (blockIdx.x == 0) {
    wait_band_tiles(p, band, /*consume=*/true);
    __syncthreads();
    if (threadIdx.x < W) store_release_sys(pull_ready_flag(c, threadIdx.x, band, rank), epoch);
  }
  wait_band_flags(c, band, epoch, /*skip=*/-1, [&](int src) { return pull_ready_flag(c, rank, band, src); });

  constexpr int U = kReduceUnroll<W>;
  sum_shard_vectors<T, W>(p, band, int64_t(blockIdx.x) * U * kReduceThreads + threadIdx.x,
                          shard_vectors<T>(p, band, rank), int64_t(gridDim.x) * U * kReduceThreads);

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // this CTA's sums precede its arrival
    if (atomicAdd(pull_counter(c, 1), 1u) == gridDim.x - 1) {
      *pull_counter(c, 1) = 0;
      __threadfence_system();  // every CTA's sums (seen through the counter) precede the flags
      for (int k = 1; k < W; ++k) store_release_sys(pull_summed_flag(c, (rank + k) % W, band, rank), epoch);
    }
  }
}

// Kernel `step` of the SM-pull schedule (steps 0..B): gathers band step - 1, then
// sums band step (see band_all_reduce.h).
template <typename T, int W>
__global__ void __launch_bounds__(kReduceThreads) band_pull_kernel(BandAllReduceParams p, int step, int bands) {
  const CommHandle& c = p.comm;
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = next_epoch(*pull_counter(c, 0));
  __syncthreads();
  const uint32_t epoch = s_epoch;
  if (step > 0) gather_peer_sums<T, W>(p, step - 1, epoch);
  if (step < bands) sum_own_shard<T, W>(p, step, epoch);

  // The call's last kernel: its last CTA to leave stores the epoch (every CTA has read it).
  if (step == bands) store_epoch_when_last(pull_counter(c, 0), pull_counter(c, 2), epoch);
}

// ------------------------------------------- SM-pull schedule, one persistent kernel
// (band_all_reduce.h draws it). Flags: ready and summed, one slot per source rank and
// CTA, carrying band numbers (the values only grow; a slot left unused for 2^31 band
// numbers would read as reached).
// Each lane (kernel) has its own slots and sequence: lane 0 runs beside the GEMM, lane 1
// after it (launch_band_pull_persistent).
constexpr int64_t kPersistentReadySlot = 2ll * kMaxBands * kMaxWorld;                      // + src·kMaxBlocks + CTA
constexpr int64_t kPersistentSummedSlot = kPersistentReadySlot + int64_t(kMaxWorld) * kMaxBlocks;  // same
constexpr int64_t kPersistentLaneSlots = 2ll * kMaxWorld * kMaxBlocks;
constexpr int kPersistentLanes = 2;
static_assert(kPersistentReadySlot + kPersistentLanes * kPersistentLaneSlots <= int64_t(kFlagsPerChannel),
              "band flags overflow the channel");

// The lane's flag slots start `lane_slots` after the channel's persistent slots; its
// counters: the last band number and the CTAs done with the call.
__device__ __forceinline__ int64_t lane_slots(int lane) { return lane * kPersistentLaneSlots; }
__device__ __forceinline__ uint32_t* lane_sequence(const CommHandle& c, int lane) {
  return pull_counter(c, lane == 0 ? 0 : 3);
}
__device__ __forceinline__ uint32_t* lane_done(const CommHandle& c, int lane) { return pull_counter(c, lane == 0 ? 2 : 4); }

__device__ __forceinline__ uint32_t* persistent_ready_flag(const CommHandle& c, int64_t slots, int dst, int src,
                                                           int cta) {
  return c.flags(dst, kChannelBandPull) + slots + kPersistentReadySlot + int64_t(src) * kMaxBlocks + cta;
}
__device__ __forceinline__ uint32_t* persistent_summed_flag(const CommHandle& c, int64_t slots, int dst, int src,
                                                            int cta) {
  return c.flags(dst, kChannelBandPull) + slots + kPersistentSummedSlot + int64_t(src) * kMaxBlocks + cta;
}

// Slice `cta` of `ctas` of [0, count): equal runs, the last ones shorter or empty.
__device__ __forceinline__ RowRange cta_slice(int64_t count, int cta, int ctas) {
  const int64_t per = (count + ctas - 1) / ctas;
  const int64_t first = per * cta < count ? per * cta : count;
  const int64_t last = first + per < count ? first + per : count;
  return {first, last - first};
}

// Every peer's slice `cta` of its sums of `band`, once that peer's CTA flagged it.
template <typename T, int W>
__device__ __forceinline__ void gather_peer_slices(const BandAllReduceParams& p, int64_t slots, int band,
                                                   uint32_t seq) {
  const CommHandle& c = p.comm;
  const int rank = c.rank, cta = blockIdx.x;
  wait_band_flags(c, band, seq, rank, [&](int src) { return persistent_summed_flag(c, slots, rank, src, cta); });
  for (int k = 1; k < W; ++k) {
    const PeerSums<T> from = peer_sums<T>(p, band, rank + k < W ? rank + k : rank + k - W);
    const RowRange mine = cta_slice(from.vectors, cta, gridDim.x);
    pull_vectors(from.from, from.to, mine.row0 + threadIdx.x, mine.row0 + mine.rows,
                 int64_t(kPullUnroll) * kReduceThreads);
  }
}

// Whether this rank's GEMM already published every tile of `band` in this call (one
// look at each, no wait); the same answer for the whole CTA.
__device__ bool band_tiles_published(const BandAllReduceParams& p, int band) {
  const CommHandle& c = p.comm;
  const BandTileSlots slots = band_tile_slots(p, band);
  const uint32_t* ready = c.flags(c.rank, kChannelTiles);
  const uint32_t* seen = c.tile_seen();
  bool published = true;
  for (int64_t i = threadIdx.x; i < slots.size() && published; i += blockDim.x)
    published = epoch_reached(load_relaxed_sys(ready + slots.slot(i)), seen[slots.slot(i)] + 1);
  return __syncthreads_and(published);
}

// Slice `cta` of this rank's shard of `band`, once this rank's tiles of the band are
// published and every peer's CTA `cta` says the same of its own (scattered tiles: once
// every rank's tiles of the shard landed here): Σ in rank order, then flagged to every
// peer's CTA `cta`.
template <typename T, int W>
__device__ __forceinline__ void sum_own_slice(const BandAllReduceParams& p, int64_t slots, int band,
                                              uint32_t seq) {
  constexpr int U = kReduceUnroll<W>;
  const CommHandle& c = p.comm;
  const int rank = c.rank, cta = blockIdx.x;
  wait_band_tiles(p, band, /*consume=*/false);
  __syncthreads();  // the acquires of every tile precede the releases (and the CTA's loads)
  if (!p.tiles_scattered) {
    if (int(threadIdx.x) < W) store_release_sys(persistent_ready_flag(c, slots, threadIdx.x, rank, cta), seq);
    wait_band_flags(c, band, seq, rank, [&](int src) { return persistent_ready_flag(c, slots, rank, src, cta); });
  }
  const RowRange mine = cta_slice(shard_vectors<T>(p, band, rank), cta, gridDim.x);
  sum_shard_vectors<T, W>(p, band, mine.row0 + threadIdx.x, mine.row0 + mine.rows, int64_t(U) * kReduceThreads);
  __syncthreads();  // every sum of the slice precedes the releases
  if (int(threadIdx.x) < W && int(threadIdx.x) != rank)
    store_release_sys(persistent_summed_flag(c, slots, threadIdx.x, rank, cta), seq);
}

// Order of the steps: a CTA gathers a band at the latest once `sum_ahead` bands are
// summed and not gathered. With 1 it gathers each band right after summing it. With 2
// (or more) it sums the next band first when that band's tiles are already published
// (the all-reduce is the bottleneck: by then the peers' sums have landed, so the
// gather does not wait), and gathers first otherwise (the GEMM is the bottleneck:
// gather while it runs, so that only the last band's sum and gather follow it).
template <typename T, int W>
__global__ void __launch_bounds__(kReduceThreads)
    band_pull_persistent_kernel(BandAllReduceParams p, int lane, int first_band, int end_band, int sum_ahead) {
  const CommHandle& c = p.comm;
  const int64_t slots = lane_slots(lane);
  __shared__ uint32_t s_base;
  __shared__ bool s_last;
  if (threadIdx.x == 0) s_base = *lane_sequence(c, lane);
  __syncthreads();
  const uint32_t base = s_base;
  const uint32_t seq0 = base + 1u - uint32_t(first_band);  // band b of this call is seq0 + b

  int summed = first_band, gathered = first_band;
  while (gathered < end_band) {
    const int pending = summed - gathered;  // bands summed but not gathered yet: 0 .. sum_ahead
    if (summed < end_band && (pending == 0 || (pending < sum_ahead && band_tiles_published(p, summed)))) {
      sum_own_slice<T, W>(p, slots, summed, seq0 + summed);
      ++summed;
    } else {
      gather_peer_slices<T, W>(p, slots, gathered, seq0 + gathered);
      ++gathered;
    }
  }

  // The last CTA to leave counts the lane's tiles as consumed and stores the sequence.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(lane_done(c, lane), 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  uint32_t* seen = c.tile_seen();
  for (int band = first_band; band < end_band; ++band) {
    const BandTileSlots tiles = band_tile_slots(p, band);
    for (int64_t i = threadIdx.x; i < tiles.size(); i += blockDim.x) seen[tiles.slot(i)] += 1;
  }
  if (threadIdx.x == 0) {
    *lane_done(c, lane) = 0;
    *lane_sequence(c, lane) = base + uint32_t(end_band - first_band);
  }
}

// After the GEMM (stream order): this rank's tiles of bands [first_band, end_band)
// counted as consumed, for a tail that the two-shot all-reduce took (their flags are
// up, so the waits return at once; they still catch a missing tile).
__global__ void __launch_bounds__(kWaitThreads)
    band_consume_tiles_kernel(BandAllReduceParams p, int first_band, int end_band) {
  for (int band = first_band; band < end_band; ++band) wait_band_tiles(p, band, /*consume=*/true);
}

// kChannelBandPull flags [kScatterEntrySlot, + W): the band_scatter schedule's entry handshake.
constexpr int64_t kScatterEntrySlot = kPersistentReadySlot + kPersistentLanes * kPersistentLaneSlots;
static_assert(kScatterEntrySlot + kMaxWorld <= int64_t(kFlagsPerChannel), "band flags overflow the channel");

// Before a GEMM that stores into peers' workspace: every rank entered this call. The
// call's number is lane 0's band sequence plus one: the same on every rank, and larger
// in every call (each call's lane 0 kernel advances it, after this kernel).
__global__ void __launch_bounds__(kSignalThreads) band_scatter_entry_kernel(BandAllReduceParams p) {
  enter_call(p.comm, kChannelBandPull, kScatterEntrySlot, *lane_sequence(p.comm, 0) + 1u, kOpMatmulAllReduce);
}

// Scattered tiles are for the persistent SM-pull kernel only (`scattered_ok`), and
// their owners are for bands of equal rows only (no separate last band).
bool valid(const BandAllReduceParams& p, int band, bool scattered_ok = false) {
  const bool last_band_ok = p.last_band_row0 == 0 || (p.last_band_row0 > 0 && p.last_band_row0 < p.m &&
                                                      p.last_band_row0 % p.tile_m == 0 && !p.tiles_scattered);
  return p.dtype != DType::kFloat32 && p.n % 8 == 0 && p.band_rows > 0 && p.band_rows % p.tile_m == 0 &&
         last_band_ok && band >= 0 && band < band_count(p) && band_count(p) <= kMaxBands &&
         (scattered_ok || !p.tiles_scattered);
}

}  // namespace

cudaError_t launch_band_wait_ready(const BandAllReduceParams& p, int band, cudaStream_t stream) {
  if (!valid(p, band)) return cudaErrorInvalidValue;
  band_wait_ready_kernel<<<1, kWaitThreads, 0, stream>>>(p, band);
  return cudaGetLastError();
}

cudaError_t launch_band_signal_landed(const BandAllReduceParams& p, int band, cudaStream_t stream) {
  if (!valid(p, band)) return cudaErrorInvalidValue;
  band_signal_landed_kernel<<<1, kSignalThreads, 0, stream>>>(p, band);
  return cudaGetLastError();
}

cudaError_t launch_band_reduce(const BandAllReduceParams& p, int band, int blocks, cudaStream_t stream) {
  if (!valid(p, band) || blocks <= 0 || blocks > kMaxBlocks) return cudaErrorInvalidValue;
  return visit_half_dtype_and_world(p.dtype, p.comm.world, [&](auto t, auto w) {
    band_reduce_kernel<decltype(t), decltype(w)::value><<<blocks, kReduceThreads, 0, stream>>>(p, band);
    return cudaGetLastError();
  });
}

cudaError_t launch_band_pull(const BandAllReduceParams& p, int step, int blocks, cudaStream_t stream) {
  const int bands = static_cast<int>(band_count(p));
  if (!valid(p, step == bands ? 0 : step) || blocks <= 0 || blocks > kMaxBlocks) return cudaErrorInvalidValue;
  return visit_half_dtype_and_world(p.dtype, p.comm.world, [&](auto t, auto w) {
    band_pull_kernel<decltype(t), decltype(w)::value><<<blocks, kReduceThreads, 0, stream>>>(p, step, bands);
    return cudaGetLastError();
  });
}

cudaError_t launch_band_pull_persistent(const BandAllReduceParams& p, int blocks, int lane, int first_band,
                                        int end_band, int sum_ahead, cudaStream_t stream) {
  if (!valid(p, 0, /*scattered_ok=*/true) || blocks <= 0 || blocks > kMaxBlocks || lane < 0 ||
      lane >= kPersistentLanes ||
      first_band < 0 || first_band >= end_band || end_band > band_count(p) || sum_ahead < 1)
    return cudaErrorInvalidValue;
  return visit_half_dtype_and_world(p.dtype, p.comm.world, [&](auto t, auto w) {
    band_pull_persistent_kernel<decltype(t), decltype(w)::value>
        <<<blocks, kReduceThreads, 0, stream>>>(p, lane, first_band, end_band, sum_ahead);
    return cudaGetLastError();
  });
}

cudaError_t launch_band_consume_tiles(const BandAllReduceParams& p, int first_band, int end_band,
                                      cudaStream_t stream) {
  if (!valid(p, 0) || first_band < 0 || first_band >= end_band || end_band > band_count(p))
    return cudaErrorInvalidValue;
  band_consume_tiles_kernel<<<1, kWaitThreads, 0, stream>>>(p, first_band, end_band);
  return cudaGetLastError();
}

cudaError_t launch_band_scatter_entry(const BandAllReduceParams& p, cudaStream_t stream) {
  if (!valid(p, 0, /*scattered_ok=*/true) || !p.tiles_scattered || p.comm.world > kSignalThreads)
    return cudaErrorInvalidValue;
  band_scatter_entry_kernel<<<1, kSignalThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_band_wait_reduced(const BandAllReduceParams& p, int band, cudaStream_t stream) {
  if (!valid(p, band)) return cudaErrorInvalidValue;
  band_wait_reduced_kernel<<<1, kSignalThreads, 0, stream>>>(p, band, band == band_count(p) - 1);
  return cudaGetLastError();
}

cudaError_t band_push_partials(const BandAllReduceParams& p, int band, cudaStream_t stream) {
  if (!valid(p, band)) return cudaErrorInvalidValue;
  const int rank = p.comm.rank, world = p.comm.world;
  for (int k = 1; k < world; ++k) {
    const int dst = (rank + k) % world;
    const RowRange s = band_shard(p, band, dst);
    if (s.rows == 0) continue;
    const int64_t off = s.row0 * p.n;
    const cudaError_t e =
        cudaMemcpyAsync(band_region(p, dst, band_slot_offset(p, rank) + off), band_region(p, rank, off),
                        s.rows * p.n * dtype_size(p.dtype), cudaMemcpyDefault, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t band_pull_sums(const BandAllReduceParams& p, int band, cudaStream_t stream) {
  if (!valid(p, band)) return cudaErrorInvalidValue;
  const int rank = p.comm.rank, world = p.comm.world;
  const size_t esize = dtype_size(p.dtype);
  for (int k = 1; k < world; ++k) {
    const int src = (rank + k) % world;
    const RowRange s = band_shard(p, band, src);
    if (s.rows == 0) continue;
    const int64_t off = s.row0 * p.n;
    const cudaError_t e = cudaMemcpyAsync(static_cast<unsigned char*>(p.output) + off * esize,
                                          band_region(p, src, band_slot_offset(p, src) + off),
                                          s.rows * p.n * esize, cudaMemcpyDefault, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace distfuse
