// All-reduce of the tile GEMM's output between two ranks, inside the GEMM kernel
// (torch-free; included by tile_gemm_kernel.cuh).
//
// With two ranks the all-reduce of a tile is one exchange: each rank sends its
// partial of the tile to the other and both add the two in rank order, so both
// end with the same bits. The tile GEMM's producer warp group has one warp that
// issues the TMA loads and three that have nothing to do; those three ("exchange
// warps") move every tile their CTA finished while the consumer warp groups
// compute the next one, so no SM is taken from the GEMM.
//
//   CTA c on both ranks: the same tiles c, c + G, c + 2G, ... (data-parallel plan)
//
//   consumers:  [mma t0][epi t0]▸published=1 [mma t1][epi t1]▸published=2 [mma t2] ...
//   exchange:                   [push t0][wait t0][Σ t0]       [push t1][wait t1][Σ t1]
//   peer's exchange:            [push t0][wait t0][Σ t0]       [push t1] ...
//
//   push t:  D_r[t] (local, loads) ─stores─▶ slot_q[r][t] on the peer q (NVLink)
//            ─ release received(t, r) on q
//   wait t:  received(t, q) here has reached the call epoch
//   Σ t:     out[t] = D_0[t] + D_1[t] in rank order (fp32, + bias once), rounded
//            once; both operands are local (the peer's came as stores)
//
// NVLink carries M·N·2 bytes each way per call, as a two-shot all-reduce would,
// spread over the whole GEMM; after the last MMA only the last wave's tiles are
// left to exchange.
//
// That last tile is the one the whole call waits for, and after their last MMA the
// consumer warp groups have nothing left to do, with registers to hold the whole
// tile: with TileExchange::last_tile_in_consumers they exchange their CTA's last
// tile themselves (the whole push in one batch of loads and stores, one wait, the sum
// in one or two batches, instead of a round trip per 15 KB of staging), beside the
// exchange warps that may still be on the tile before it:
//
//   consumers:  ... [mma t(n-2)][epi]▸ [mma t(n-1)][epi] [push t(n-1)][wait][Σ t(n-1)]
//   exchange:   ...                    [push t(n-2)][wait][Σ t(n-2)]
//
// With one wave of tiles (one tile per CTA) the consumers exchange every tile and the
// exchange warps only make the entry handshake.
//
// Slots, flags and the call epoch are the owner schedule's (kernels/allreduce/
// tile_slots.cuh), so the two schedules can follow each other on one workspace:
// received flags carry the call epoch, slots are double-buffered by its parity,
// and no byte is pushed before the peer entered the same call (enter handshake,
// done by the exchange warps while the consumers compute the first tile).
//
// Why it cannot deadlock: the consumers never wait for the exchange warps; the
// exchange warps of CTA c wait for the peer's CTA c at the same tile, which pushes
// before it waits, and both take their tiles in the same increasing order.
#pragma once

#include <cstdint>

#include "distfuse/comm/signal.cuh"
#include "kernels/allreduce/rank_order_sum.cuh"
#include "kernels/allreduce/tile_slots.cuh"
#include "kernels/common/launch.cuh"
#include "kernels/common/vec.cuh"

namespace distfuse {

// What the exchange warps of every CTA need; output == nullptr: no exchange.
struct TileExchange {
  void* output;                 // [M, N], ld = N
  const void* bias;             // [N] or null
  CommHandle comm;              // D is this rank's tile partial in its workspace
  bool through_owners;          // any W: tile owners sum (tile_owner_exchange.cuh); else W = 2, both sum
  bool last_tile_in_consumers;  // pair exchange: each CTA's consumers exchange its last tile
};

constexpr int kExchangeThreads = 96;  // warps 1..3 of the producer warp group
// The producer warp group runs on 40 registers (the consumers need the rest), too
// few to keep many loads in flight; the exchange warps load through shared memory
// with cp.async instead: each thread owns kExchangeBatch 16-byte slots of a
// staging buffer (the shared memory the GEMM's pipeline stages leave over).
constexpr int kExchangeStagingBytes = 15 * 1024;
constexpr int kExchangeBatch = kExchangeStagingBytes / 16 / kExchangeThreads;  // 10
static_assert(kExchangeBatch % 2 == 0, "the sum stages two sources");

// Where each CTA's exchange spends its time: in builds with DISTFUSE_EXCHANGE_TRACE
// (benchmarks/micro/exchange_trace_probe.cu) one thread stamps the global timer at each
// of these steps, kExchangeTraceSlots words per CTA just past the workspace layout's end
// (the probe allocates them; a step taken once per tile keeps its last stamp). In other
// builds exchange_trace is empty.
enum ExchangeTraceStep : int {
  kTraceKernelStart = 0,     // thread 0, first thing
  kTraceEntered = 1,         // exchange warps: the call-entry handshake done
  kTraceMmaDone = 2,         // consumers: a tile's last MMA retired
  kTracePublished = 3,       // consumers: a tile's stores complete, published in the CTA
  kTraceWarpsPushed = 4,     // exchange warps: a tile pushed to the peer
  kTraceWarpsPeerSeen = 5,   // exchange warps: the peer's copy of that tile here
  kTraceWarpsSummed = 6,     // exchange warps: its sum written
  kTraceTailPushed = 7,      // consumers: the CTA's last tile pushed
  kTraceTailPeerSeen = 8,    // consumers: the peer's copy of it here
  kTraceTailSummed = 9,      // consumers: its sum written (every consumer thread)
  kExchangeTraceSlots = 16,
};
__device__ __forceinline__ void exchange_trace(const CommHandle& c, int step) {
#if defined(DISTFUSE_EXCHANGE_TRACE)
  reinterpret_cast<volatile uint64_t*>(c.peer_base[c.rank] + c.layout.total_bytes)[blockIdx.x * kExchangeTraceSlots +
                                                                                    step] = global_timer_ns();
#else
  (void)c;
  (void)step;
#endif
}

// Words of shared memory the consumers and the exchange warps of a CTA share.
struct ExchangeCtaState {
  uint32_t published;  // tiles the consumers stored so far
  // A wait timed out: that group stops. One word per group of warps, each written by its
  // own thread 0 before a barrier of the group and read by the group after it, so that
  // every warp of a group takes the same branch (a word the other group could set
  // between two warps' reads would leave some of them at the group's next barrier).
  uint32_t aborted;       // the exchange warps'
  uint32_t tail_aborted;  // the consumers' (their CTA's last tile)
  uint32_t epoch;      // this call's, read at the kernel's start (the last CTA to finish
                       // rewrites the counter)
  int tiles_end;       // the pair exchange warps take this CTA's tiles below it
};

__device__ __forceinline__ void cp_async_16(uint4* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
// Waits for every cp.async this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
}

// Consumer warp 0, after it committed the TMA stores of the CTA's `count`-th tile:
// wait until they are complete, order them before generic-proxy accesses, then
// tell the exchange warps of this CTA.
__device__ __forceinline__ void publish_tile_in_cta(volatile ExchangeCtaState* cta, uint32_t count) {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
  __threadfence();
  if ((threadIdx.x & 31) == 0) cta->published = count;
}

// Exchange warps: wait until the consumers published the CTA's (done + 1)-th tile, then
// order its stores before this thread's loads of it.
__device__ __forceinline__ void wait_tile_in_cta(const volatile ExchangeCtaState* cta, uint32_t done) {
  while (cta->published <= done) __nanosleep(128);
  __threadfence();
}

// In a kernel launched as the GEMM's programmatic dependent (one thread): waits for the
// GEMM to end and its writes to be visible, then traps with the message of a wait of
// the exchange that timed out, if any.
__device__ __forceinline__ void exchange_timeout_check(const CommHandle& c) {
  wait_for_previous_kernel();
  const volatile uint32_t* record = exchange_timeout_record(c);
  const uint32_t what = record[0];
  if (what != 0)
    timeout_trap(kOpMatmulAllReduce, what == kExchangeTimeoutEntry ? "call entry of CTA" : "tile", int(record[1]),
                 int(record[2]), record[3], record[4]);
}

// Thread 0 of a group of exchanging warps: poll_or_record_timeout, and at the timeout also
// sets the group's stop word (ExchangeCtaState).
__device__ __forceinline__ bool wait_or_record_timeout(const CommHandle& c, volatile uint32_t* aborted,
                                                       const uint32_t* flag, uint32_t epoch, uint32_t what,
                                                       int index, int peer) {
  if (poll_or_record_timeout(c, flag, epoch, what, index, peer)) return true;
  *aborted = 1;
  return false;
}

// Thread 0 of a CTA's exchange: the call-entry handshake, so that no byte is pushed to a
// peer still in an earlier call. enter_call's protocol (comm/signal.cuh) in one thread
// and without its trap or block-wide barrier, which the GEMM kernel may not use. With
// `announce` (CTA 0's exchange warps) tell every peer that this rank entered the call;
// then wait until every peer did (each peer's CTA 0 tells every CTA here). False, with
// the group's stop word set, after a timeout.
__device__ __forceinline__ bool enter_exchange_call(const CommHandle& c, volatile uint32_t* aborted,
                                                    uint32_t epoch, bool announce) {
  for (int q = 0; q < c.world; ++q)
    if (q != c.rank && announce) store_release_sys(c.flags(q, kChannelTiles) + kTileEntrySlot + c.rank, epoch);
  for (int q = 0; q < c.world; ++q)
    if (q != c.rank && !wait_or_record_timeout(c, aborted, c.flags(c.rank, kChannelTiles) + kTileEntrySlot + q,
                                               epoch, kExchangeTimeoutEntry, int(blockIdx.x), q))
      return false;
  return true;
}

// After the CTA's last tile: the last CTA to finish publishes the epoch to the next
// call on the stream.
template <typename Sync>
__device__ __forceinline__ void finish_exchange_call(const CallEpoch& ce, uint32_t epoch, Sync sync, int x) {
  sync();
  if (x == 0) {
    __threadfence();
    if (atomicAdd(ce.done, 1u) == gridDim.x - 1) {
      *ce.done = 0;
      *ce.value = epoch;
    }
  }
}

// Thread x's part of one tile, from[] -> to[]: its rows r0 = x / kLanesPerRow, r0 +
// kRowStep, ... below `rows`, at offsets first_off + (r - r0) * n, kExchangeBatch rows
// a batch loaded into its staging slots (slot[k * kExchangeThreads]) and stored.
template <typename T, int kLanesPerRow>
__device__ __forceinline__ void copy_tile_through_staging(const T* from, T* to, int64_t first_off, int rows,
                                                          int64_t n, uint4* slot, int x) {
  constexpr int kRowStep = kExchangeThreads / kLanesPerRow;
  const int64_t step = kRowStep * n;
  for (int r = x / kLanesPerRow; r < rows; r += kExchangeBatch * kRowStep) {
    const int64_t off = first_off + int64_t(r - x / kLanesPerRow) * n;
    const T* src = from + off;
#pragma unroll
    for (int k = 0; k < kExchangeBatch; ++k, src += step)
      if (r + k * kRowStep < rows) cp_async_16(slot + k * kExchangeThreads, src);
    cp_async_wait_all();
    T* dst = to + off;
#pragma unroll
    for (int k = 0; k < kExchangeBatch; ++k, dst += step)
      if (r + k * kRowStep < rows) store_plain(dst, slot[k * kExchangeThreads]);
  }
}

// The exchange warps of one CTA (thread x of kExchangeThreads), for the tiles
// blockIdx.x, blockIdx.x + gridDim.x, ... below `tiles` (the data-parallel plan);
// tile_coord(i, &t, &row0, &col0) gives tile i's flag index and origin in D; `sync`
// is a barrier of the exchange warps. kLanesPerRow threads cover a tile row
// (tile_n / 8 vectors), so a thread's vectors lie kThreads / kLanesPerRow rows apart
// in one column and its offsets advance by a constant.
//
// A wait that times out is recorded (exchange_timeout_record) and the exchange
// stops; the kernel after the GEMM (exchange_timeout_check) reports it and traps, as
// this kernel may not print (see poll_flag_reached).
template <typename T, int kTileM, int kLanesPerRow, typename TileCoord, typename Sync>
__device__ void exchange_tiles_with_peer(const TileExchange& e, int64_t m, int64_t n, int tiles,
                                         volatile ExchangeCtaState* cta, uint4* staging, int x,
                                         TileCoord tile_coord, Sync sync) {
  constexpr int kThreads = kExchangeThreads;
  constexpr int kSum = kExchangeBatch / 2;
  constexpr int kRowStep = kExchangeThreads / kLanesPerRow;
  static_assert(kExchangeThreads % kLanesPerRow == 0, "whole rows per pass");
  const CommHandle& c = e.comm;
  const int rank = c.rank, peer = 1 - c.rank;
  const CallEpoch ce = call_epoch(c);
  const uint32_t epoch = next_epoch(*ce.value);
  const int64_t mn = m * n;
  const int parity = int(epoch & 1);
  const T* mine = partial_of<T>(c, rank);
  T* to_peer = receive_slot<T>(c, peer, mn, parity, rank);
  const T* from_peer = receive_slot<T>(c, rank, mn, parity, peer);
  const T* first = rank == 0 ? mine : from_peer;  // rank order of the sum
  const T* second = rank == 0 ? from_peer : mine;
  T* out = static_cast<T*>(e.output);
  const T* bias = static_cast<const T*>(e.bias);
  const int lane = x % kLanesPerRow;
  const int64_t step = kRowStep * n;

  if (x == 0) enter_exchange_call(c, &cta->aborted, epoch, blockIdx.x == 0);
  sync();
  if (cta->aborted) return;
  if (x == 0) exchange_trace(c, kTraceEntered);

  uint32_t done = 0;
  for (int tile = int(blockIdx.x); tile < tiles; tile += int(gridDim.x), ++done) {
    wait_tile_in_cta(cta, done);
    int t;
    int64_t row0, col0;
    tile_coord(tile, &t, &row0, &col0);
    const int rows = int(min(int64_t(kTileM), m - row0));
    // This thread's column of the tile, if the tile is that wide.
    const bool active = col0 + int64_t(lane) * Pack<T, 16>::kElems < n;
    const int64_t first_off = (row0 + x / kLanesPerRow) * n + col0 + int64_t(lane) * Pack<T, 16>::kElems;
    uint4* slot = staging + x;  // this thread's slots: slot[k * kThreads]
    if (active) copy_tile_through_staging<T, kLanesPerRow>(mine, to_peer, first_off, rows, n, slot, x);  // push
    sync();  // every push of the tile precedes the release
    if (x == 0) {
      exchange_trace(c, kTraceWarpsPushed);
      store_release_sys(received_flag(c, peer, t, rank), epoch);
      wait_or_record_timeout(c, &cta->aborted, received_flag(c, rank, t, peer), epoch, kExchangeTimeoutTile, t,
                             peer);
      exchange_trace(c, kTraceWarpsPeerSeen);
    }
    sync();
    if (cta->aborted) return;
    if (active) {  // sum: kSum rows a batch, both sources loaded into the slots
      const T* bias_vec = bias ? bias + col0 + lane * Pack<T, 16>::kElems : nullptr;
      for (int r = x / kLanesPerRow; r < rows; r += kSum * kRowStep) {
        const int64_t off = first_off + int64_t(r - x / kLanesPerRow) * n;
        const T* a = first + off;
        const T* b = second + off;
#pragma unroll
        for (int k = 0; k < kSum; ++k, a += step, b += step)
          if (r + k * kRowStep < rows) {
            cp_async_16(slot + k * kThreads, a);
            cp_async_16(slot + (kSum + k) * kThreads, b);
          }
        cp_async_wait_all();
        T* to = out + off;
#pragma unroll
        for (int k = 0; k < kSum; ++k, to += step)
          if (r + k * kRowStep < rows) {
            const uint4 pair[2] = {slot[k * kThreads], slot[(kSum + k) * kThreads]};
            store_plain(to, sum_in_rank_order<T, 2>(pair, bias_vec));
          }
      }
    }
#if defined(DISTFUSE_EXCHANGE_TRACE)
    sync();
    if (x == 0) exchange_trace(c, kTraceWarpsSummed);
#endif
  }

  finish_exchange_call(ce, epoch, sync, x);
}

// The consumer warp groups of one CTA (thread y of kThreads), after their last tile
// `tile` is stored and published in the CTA: its exchange with the peer. Each thread
// pushes its kTileM / kRowStep vectors of the tile in one batch (the consumers run on
// far more registers than the exchange warps), then sums both copies of up to 8 of
// them a batch. `sync` is a barrier of the consumers. The same sum as
// exchange_tiles_with_peer's, so the same bits.
template <typename T, int kTileM, int kLanesPerRow, int kThreads, typename TileCoord, typename Sync>
__device__ void exchange_last_tile_in_consumers(const TileExchange& e, int64_t m, int64_t n, int tile,
                                                volatile ExchangeCtaState* cta, int y, TileCoord tile_coord,
                                                Sync sync) {
  constexpr int kRowStep = kThreads / kLanesPerRow;
  constexpr int kVectors = kTileM / kRowStep;
  constexpr int kSumVectors = kVectors < 8 ? kVectors : 8;
  static_assert(kVectors % kSumVectors == 0, "whole sum passes");
  static_assert(kThreads % kLanesPerRow == 0 && kTileM % kRowStep == 0, "whole rows per pass");
  const CommHandle& c = e.comm;
  const int rank = c.rank, peer = 1 - c.rank;
  const uint32_t epoch = cta->epoch;
  // No byte before the peer entered this call (the exchange warps announce it).
  if (y == 0) enter_exchange_call(c, &cta->tail_aborted, epoch, false);
  sync();
  if (cta->tail_aborted) return;
  const int64_t mn = m * n;
  const int parity = int(epoch & 1);

  int t;
  int64_t row0, col0;
  tile_coord(tile, &t, &row0, &col0);
  const int rows = int(min(int64_t(kTileM), m - row0));
  const int r0 = y / kLanesPerRow;
  const int64_t col = col0 + int64_t(y % kLanesPerRow) * Pack<T, 16>::kElems;
  const bool active = col < n;
  const int64_t first_off = (row0 + r0) * n + col;
  const int64_t step = kRowStep * n;

  if (active) {  // push: the whole tile in flight
    const T* from = partial_of<T>(c, rank) + first_off;
    T* to = receive_slot<T>(c, peer, mn, parity, rank) + first_off;
    uint4 mine[kVectors];
#pragma unroll
    for (int k = 0; k < kVectors; ++k)
      if (r0 + k * kRowStep < rows) mine[k] = load_cg(from + k * step);
#pragma unroll
    for (int k = 0; k < kVectors; ++k)
      if (r0 + k * kRowStep < rows) store_plain(to + k * step, mine[k]);
  }
  sync();  // every push of the tile precedes the release
  if (y == 0) {
    exchange_trace(c, kTraceTailPushed);
    store_release_sys(received_flag(c, peer, t, rank), epoch);
    wait_or_record_timeout(c, &cta->tail_aborted, received_flag(c, rank, t, peer), epoch, kExchangeTimeoutTile, t,
                           peer);
    exchange_trace(c, kTraceTailPeerSeen);
  }
  sync();
  if (cta->tail_aborted || !active) return;
  // Sum: both copies of kSumVectors rows a pass (as many registers as the push).
  const T* mine = partial_of<T>(c, rank) + first_off;
  const T* from_peer = receive_slot<T>(c, rank, mn, parity, peer) + first_off;
  const T* first = rank == 0 ? mine : from_peer;  // rank order of the sum
  const T* second = rank == 0 ? from_peer : mine;
  const T* bias_vec = e.bias ? static_cast<const T*>(e.bias) + col : nullptr;
  T* out = static_cast<T*>(e.output) + first_off;
#pragma unroll
  for (int k0 = 0; k0 < kVectors; k0 += kSumVectors) {
    uint4 pairs[kSumVectors][2];
#pragma unroll
    for (int k = 0; k < kSumVectors; ++k)
      if (r0 + (k0 + k) * kRowStep < rows) {
        pairs[k][0] = load_cg(first + (k0 + k) * step);
        pairs[k][1] = load_cg(second + (k0 + k) * step);
      }
#pragma unroll
    for (int k = 0; k < kSumVectors; ++k)
      if (r0 + (k0 + k) * kRowStep < rows)
        store_plain(out + (k0 + k) * step, sum_in_rank_order<T, 2>(pairs[k], bias_vec));
  }
  exchange_trace(c, kTraceTailSummed);  // every thread: the last stamp is the slowest one's
}

}  // namespace distfuse
