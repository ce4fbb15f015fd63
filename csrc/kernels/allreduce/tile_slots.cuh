// Where the tile all-reduces of GEMM outputs keep their data and flags in the
// workspace (torch-free): shared by the owner schedule (tile_all_reduce.h) and the
// tile exchanges inside the tile GEMM (kernels/gemm/tile_pair_exchange.cuh,
// tile_owner_exchange.cuh), which take turns on the same regions and one call-epoch
// sequence.
//
//   tile region of rank r (mn = M·N elements, each part laid out like D):
//     D_r at 0 | slot[parity 0][src 0..W-1] | slot[parity 1][src 0..W-1]
//   kChannelTiles flags:          [0, kMaxTiles) ready counters bumped by this rank's
//                                 GEMM, [kMaxTiles, + W) call-entry handshake
//   kChannelTilesReceived flags:  per (tile t, source rank): the call epoch, stored by
//                                 the source once its data for tile t landed here
//   kChannelTiles counters:       [0] the last call's epoch, [1] CTAs done with this call,
//                                 [2, 7) the first timeout of a tile exchange (below)
#pragma once

#include <cstdint>

#include "distfuse/comm/handle.h"
#include "distfuse/comm/signal.cuh"

namespace distfuse {

static_assert(uint64_t(kMaxTiles) + kMaxWorld <= kFlagsPerChannel, "tile flags overflow the channel");

// Slot of the call-entry handshake (enter_call) in the kChannelTiles flags.
constexpr int64_t kTileEntrySlot = kMaxTiles;

__device__ __forceinline__ uint32_t* ready_flag(const CommHandle& c, int rank, int t) {
  return c.flags(rank, kChannelTiles) + t;
}

__device__ __forceinline__ uint32_t* received_flag(const CommHandle& c, int rank, int t, int src) {
  return c.flags(rank, kChannelTilesReceived) + int64_t(t) * kMaxWorld + src;
}

template <typename T>
__device__ __forceinline__ T* partial_of(const CommHandle& c, int rank) {
  return reinterpret_cast<T*>(c.peer_base[rank] + c.layout.tiles_offset);
}

// What `src` sent to `dst` in calls of one parity, laid out like D.
template <typename T>
__device__ __forceinline__ T* receive_slot(const CommHandle& c, int dst, int64_t mn, int parity, int src) {
  return partial_of<T>(c, dst) + mn + (int64_t(parity) * c.world + src) * mn;
}

// The call epoch: one counter per rank, advanced by one in every call of a tile
// all-reduce (every rank makes the same calls, so the epochs agree). Every CTA reads
// it first; the last CTA to finish stores the new value.
struct CallEpoch {
  uint32_t* value;
  uint32_t* done;
};
__device__ __forceinline__ CallEpoch call_epoch(const CommHandle& c) {
  uint32_t* base = c.counters(kChannelTiles);
  return {base, base + 1};
}

// Where a tile exchange records a wait that timed out (it may not print from the
// GEMM kernel): [0] what (0 none, kExchangeTimeoutEntry, kExchangeTimeoutTile),
// [1] CTA or tile, [2] peer, [3] expected epoch, [4] value seen.
constexpr uint32_t kExchangeTimeoutEntry = 1;
constexpr uint32_t kExchangeTimeoutTile = 2;
__device__ __forceinline__ uint32_t* exchange_timeout_record(const CommHandle& c) {
  return c.counters(kChannelTiles) + 2;
}

// Waits until `flag` reaches `epoch`; at the timeout, records the wait (when several
// time out, any one record is enough to report) and returns false. No call in its
// code: kernels that issue wgmma use it (see poll_flag_reached).
__device__ __forceinline__ bool poll_or_record_timeout(const CommHandle& c, const uint32_t* flag, uint32_t epoch,
                                                       uint32_t what, int index, int peer) {
  uint32_t seen;
  if (poll_flag_reached(flag, epoch, c.timeout_ns, &seen)) return true;
  uint32_t* record = exchange_timeout_record(c);
  record[1] = uint32_t(index);
  record[2] = uint32_t(peer);
  record[3] = epoch;
  record[4] = seen;
  __threadfence();
  record[0] = what;
  return false;
}

}  // namespace distfuse
