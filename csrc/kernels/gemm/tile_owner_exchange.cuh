// All-reduce of the tile GEMM's output among W ranks, inside the GEMM kernel,
// through tile owners (torch-free; included by tile_gemm_kernel.cuh).
//
// The exchange warps of tile_pair_exchange.cuh (warps 1-3 of the producer warp
// group, idle otherwise), for any W >= 2. CTA c takes the same tiles in the same
// order on every rank (data-parallel plan); its s-th tile is owned by rank
// (c + s) mod W, so every rank owns a W-th of every wave and every CTA owns a
// W-th of its tiles. For each tile t:
//
//   non-owner r:  push   D_r[t] (local) ─stores─▶ slot_o[r][t] on the owner o
//                        ─ release received(t, r) on o
//   owner o:      wait   received(t, q) on o for every q != o
//                 Σ t    out[t] = D_0[t] + ... + D_{W-1}[t] in rank order (fp32,
//                        + bias once), rounded once, also into slot_o[o][t] (the
//                        owner's own slot, which no peer writes) ─ release
//                        received(t, o) on every q (q receives no partial of t)
//   non-owner r:  pull   slot_o[o][t] ─loads─▶ out[t], after received(t, o) here
//
// A CTA pulls the sum of a tile after pushing (or summing) its next one, so the
// owner has had one step to finish it:
//
//   step:             s = 0              s = 1                   s = 2
//   consumers:   [mma t0][epi]▸  [mma t1][epi]▸          [mma t2][epi]▸
//   rank 0 (owns t0, t3, ...):   [wait, Σ t0 ▸]          [push t1]             [push t2][pull t1]
//   rank 1 (owns t1, t4, ...):   [push t0]               [wait, Σ t1 ▸][pull t0] [push t2] ...
//
// NVLink carries 2(W-1)/W of M·N·2 bytes each way per rank, as a two-shot
// all-reduce would, spread over the GEMM; after the last MMA the last wave's push,
// sum and pull are left.
//
// Why it cannot deadlock: the consumers never wait for the exchange warps. Every
// wait of step s is for something a peer's CTA c does at its step s (a push, made
// before any wait of that step) or s - 1 (a sum), and the waits of step s - 1
// resolve first, by induction from the entry handshake.
//
// Slots, flags, epochs, the entry handshake and the timeout record are the pair
// exchange's (kernels/allreduce/tile_slots.cuh).
//
// 15 KB in flight per SM and a three-hop chain per step keep it at ~115-150 GB/s beside
// the GEMM (benchmarks/NOTES.md, v18-v19): slower than the band schedule where the
// all-reduce dominates and than the pair exchange at W = 2, so the dispatcher takes it
// only where the GEMM dominates below the band schedule's range (tuning.h,
// owner_exchange_min_m).
#pragma once

#include <cstdint>

#include "kernels/gemm/tile_pair_exchange.cuh"

namespace distfuse {

template <typename T, int kTileM, int kLanesPerRow, typename TileCoord, typename Sync>
__device__ void exchange_tiles_through_owners(const TileExchange& e, int64_t m, int64_t n, int tiles,
                                              volatile ExchangeCtaState* cta, uint4* staging, int x,
                                              TileCoord tile_coord, Sync sync) {
  constexpr int kThreads = kExchangeThreads;
  constexpr int kRowStep = kExchangeThreads / kLanesPerRow;
  static_assert(kExchangeThreads % kLanesPerRow == 0, "whole rows per pass");
  static_assert(kExchangeBatch >= kMaxWorld, "a sum stages every rank's vector of a row");
  const CommHandle& c = e.comm;
  const int world = c.world, rank = c.rank;
  const CallEpoch ce = call_epoch(c);
  const uint32_t epoch = next_epoch(*ce.value);
  const int64_t mn = m * n;
  const int parity = int(epoch & 1);
  const T* mine = partial_of<T>(c, rank);
  T* out = static_cast<T*>(e.output);
  const T* bias = static_cast<const T*>(e.bias);
  const int lane = x % kLanesPerRow;
  const int64_t step = kRowStep * n;
  const int sum_rows = kExchangeBatch / world;  // rows of a sum batch, every rank's vector staged
  uint4* slot = staging + x;                        // this thread's slots: slot[k * kThreads]
  auto wait_for = [&](const uint32_t* flag, uint32_t what, int index, int peer) {
    return wait_or_record_timeout(c, &cta->aborted, flag, epoch, what, index, peer);
  };

  if (x == 0) enter_exchange_call(c, &cta->aborted, epoch, blockIdx.x == 0);
  sync();
  if (cta->aborted) return;

  struct TileRows {
    int t;             // flag index
    int rows;          // rows of the tile inside D
    bool active;       // this thread's column lies inside D
    int64_t col;       // this thread's first column
    int64_t first_off; // this thread's first vector in the tile
  };
  auto rows_of = [&](int tile) {
    TileRows g;
    int64_t row0, col0;
    tile_coord(tile, &g.t, &row0, &col0);
    g.rows = int(min(int64_t(kTileM), m - row0));
    g.col = col0 + int64_t(lane) * Pack<T, 16>::kElems;
    g.active = g.col < n;
    g.first_off = (row0 + x / kLanesPerRow) * n + g.col;
    return g;
  };
  // from[tile] -> to[tile] through the staging slots.
  auto copy_tile = [&](const TileRows& g, const T* from, T* to) {
    if (g.active) copy_tile_through_staging<T, kLanesPerRow>(from, to, g.first_off, g.rows, n, slot, x);
  };
  // The owner's sum of the tile into out and its own slot, sum_rows rows a batch.
  auto sum_tile = [&](const TileRows& g) {
    if (!g.active) return;
    T* own_slot = receive_slot<T>(c, rank, mn, parity, rank);
    const T* bias_vec = bias ? bias + g.col : nullptr;
    for (int r = x / kLanesPerRow; r < g.rows; r += sum_rows * kRowStep) {
      const int64_t off = g.first_off + int64_t(r - x / kLanesPerRow) * n;
      for (int k = 0; k < sum_rows && r + k * kRowStep < g.rows; ++k)
        for (int src = 0; src < world; ++src)
          cp_async_16(slot + (k * world + src) * kThreads,
                      (src == rank ? mine : receive_slot<T>(c, rank, mn, parity, src)) + off + k * step);
      cp_async_wait_all();
      for (int k = 0; k < sum_rows && r + k * kRowStep < g.rows; ++k) {
        const uint4 sum = sum_strided_in_rank_order<T>(slot + k * world * kThreads, kThreads, world, bias_vec);
        store_plain(out + off + k * step, sum);
        store_plain(own_slot + off + k * step, sum);
      }
    }
  };
  // A non-owner's pull of the owner's sum of `tile`; false after a timeout.
  auto pull_sum = [&](int tile, int owner) {
    const TileRows g = rows_of(tile);
    if (x == 0) wait_for(received_flag(c, rank, g.t, owner), kExchangeTimeoutTile, g.t, owner);
    sync();
    if (cta->aborted) return false;
    copy_tile(g, receive_slot<T>(c, owner, mn, parity, owner), out);
    return true;
  };

  uint32_t done = 0;
  int pending_tile = -1, pending_owner = 0;  // the last tile whose sum is still to pull
  for (int tile = int(blockIdx.x); tile < tiles; tile += int(gridDim.x), ++done) {
    wait_tile_in_cta(cta, done);
    const TileRows g = rows_of(tile);
    const int owner = int((blockIdx.x + done) % uint32_t(world));
    if (owner != rank) {
      copy_tile(g, mine, receive_slot<T>(c, owner, mn, parity, rank));
      sync();  // every push of the tile precedes the release
      if (x == 0) store_release_sys(received_flag(c, owner, g.t, rank), epoch);
    } else {
      if (x == 0)
        for (int q = 0; q < world; ++q)
          if (q != rank && !wait_for(received_flag(c, rank, g.t, q), kExchangeTimeoutTile, g.t, q)) break;
      sync();
      if (cta->aborted) return;
      sum_tile(g);
      sync();  // every store of the sum precedes the releases
      if (x == 0)
        for (int q = 0; q < world; ++q)
          if (q != rank) store_release_sys(received_flag(c, q, g.t, rank), epoch);
    }
    if (pending_tile >= 0 && !pull_sum(pending_tile, pending_owner)) return;
    pending_tile = owner != rank ? tile : -1;
    pending_owner = owner;
  }
  if (pending_tile >= 0 && !pull_sum(pending_tile, pending_owner)) return;
  finish_exchange_call(ce, epoch, sync, x);
}

}  // namespace distfuse
