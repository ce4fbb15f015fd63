// The owner scatter of the band_scatter schedule (kernels/allreduce/band_all_reduce.h)
// made by the tile GEMM's exchange warps instead of its epilogue (torch-free; included
// by tile_gemm_kernel.cuh).
//
// The epilogue stores every tile into this rank's D, as for band_pull; warps 1-3 of the
// producer warp group (idle otherwise) then move each tile of their CTA to the rank
// that owns its rows and raise the tile's flag there, while the consumers compute the
// next tile:
//
//   consumers:  [mma t0][epi t0 ▸ D]▸published=1 [mma t1][epi t1 ▸ D]▸published=2 [mma t2] ...
//   exchange:                      [push t0][flag]                  [push t1][flag]
//
//   push t (owner o ≠ r):  D_r[t] (local, loads) ─stores─▶ recv_o[r][t] on o (NVLink)
//                          ─ release flag(o, r·T + t)
//   own t  (o = r):        nothing moves (the band kernel reads D_r[t]) ─ release flag(r, r·T + t)
//
// With the epilogue's TMA stores to a peer, the GEMM slowed by ~40 % beside the band
// kernel (benchmarks/NOTES.md, v20): a store to a peer drains at one SM's NVLink pace
// and the next tile's TMA loads queue behind it. Here the TMA unit stores locally only;
// NVLink is fed by the load/store units of warps that have no other work (faster than
// the TMA stores by 3-16 %, still behind band_pull: NOTES.md, v43).
//
// Why it cannot deadlock: the exchange warps wait only for their own CTA's consumers,
// which never wait for them. The entry handshake before the GEMM (band_all_reduce.h)
// keeps the stores off a peer still in an earlier call, as for the epilogue's stores.
#pragma once

#include <cstdint>

#include "distfuse/comm/signal.cuh"
#include "kernels/allreduce/band_geometry.h"
#include "kernels/gemm/tile_pair_exchange.cuh"

namespace distfuse {

// The owner scatter of a tile GEMM call (TileGemmParams::scatter_*): tile row tm belongs
// to rank scatter_owner_of_tile_row(tm, ...) of `world` (0: no scatter); rank p's buffer
// for this rank's partials of the rows p owns (laid out like D, ld = N; this rank's own is
// D) and p's tile flags for them. The exchange warps store there by load/store units
// (by_exchange_warps), or the epilogue's TMA stores do (then owner_d is unused: the
// epilogue's parameters per owner carry the buffers).
struct TileOwnerScatter {
  int world;
  int rank;
  int band_tile_rows;
  bool by_exchange_warps;
  void* owner_d[kMaxWorld];
  uint32_t* owner_flags[kMaxWorld];

  __host__ __device__ bool by_epilogue() const { return world > 0 && !by_exchange_warps; }
};

// The exchange warps of one CTA (thread x of kExchangeThreads), for the tiles
// blockIdx.x, blockIdx.x + gridDim.x, ... below `tiles` (the data-parallel plan);
// tile_coord(i, &t, &row0, &col0) gives tile i's flag index and origin in D; `sync`
// is a barrier of the exchange warps.
template <typename T, int kTileM, int kLanesPerRow, typename TileCoord, typename Sync>
__device__ void scatter_tiles_to_owners(const TileOwnerScatter& s, int64_t m, int64_t n, int tiles,
                                        volatile ExchangeCtaState* cta, uint4* staging, int x,
                                        TileCoord tile_coord, Sync sync) {
  static_assert(kExchangeThreads % kLanesPerRow == 0, "whole rows per pass");
  const T* mine = static_cast<const T*>(s.owner_d[s.rank]);
  const int64_t tiles_m = (m + kTileM - 1) / kTileM;
  const int lane = x % kLanesPerRow;
  uint4* slot = staging + x;  // this thread's slots: slot[k * kExchangeThreads]
  for (int tile = int(blockIdx.x), done = 0; tile < tiles; tile += int(gridDim.x), ++done) {
    wait_tile_in_cta(cta, uint32_t(done));
    int t;
    int64_t row0, col0;
    tile_coord(tile, &t, &row0, &col0);
    const int owner = scatter_owner_of_tile_row(row0 / kTileM, tiles_m, s.band_tile_rows, s.world);
    if (owner != s.rank) {
      const int64_t col = col0 + int64_t(lane) * Pack<T, 16>::kElems;
      if (col < n)
        copy_tile_through_staging<T, kLanesPerRow>(mine, static_cast<T*>(s.owner_d[owner]),
                                                   (row0 + x / kLanesPerRow) * n + col,
                                                   int(min(int64_t(kTileM), m - row0)), n, slot, x);
      sync();  // every push of the tile precedes the release
    }
    if (x == 0) add_release_sys(s.owner_flags[owner] + t, 1);
  }
}

}  // namespace distfuse
