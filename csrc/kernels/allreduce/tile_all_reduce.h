// All-reduce of a GEMM output tile by tile, while the GEMM still runs (torch-free).
//
// Every rank's GEMM writes its partial product D_r [M, N] into its workspace tile
// region and bumps flag[t] (this rank's flags, kChannelTiles) when tile t is
// complete (see TileGemmParams). Consumer CTAs run beside the GEMM on the SMs it
// leaves free and reduce each tile as soon as it is ready on every rank. Tile t
// number i (the GEMM's tile order, tile_gemm_tile_coord in kernels/gemm/tile_gemm.h)
// is handled by consumer CTA
// i % C on every rank, in increasing i, which is the order in which the persistent
// GEMM finishes tiles, wave by wave. Flags are indexed tm * tiles_n + tn.
//
// Every byte crosses NVLink as a store (pushed), and every rank polls only its
// own flags: remote loads need a round trip each and hold an SM for it, while
// stores are posted.
//
// Owner schedule (prefill: bandwidth-bound, 2(W-1)/W·M·N bytes per rank over
// NVLink; at least W tiles). Tile i is owned by rank o = i % W:
//
//   non-owner r:  D_r[t] ready ─push─▶ recv_o[r][t] ─flag(t, r)─▶ o
//                 ... one tile later: wait flag(t, o) ─ copy recv_r[o][t] ─▶ out
//   owner o:      D_o[t] ready, wait W-1 flags ─ Σ in rank order (+ bias) ─▶ out,
//                 ─push─▶ recv_p[o][t] of every p ≠ o ─flag(t, o)─▶ p
//
//     i:      0         1         2         3        (W = 2, one consumer CTA)
//     r0:  reduce    push→r1   reduce    push→r1, copy-out 1
//     r1:  push→r0   reduce    push→r0,  reduce
//                              copy-out 0
//
// (Decode sizes, with fewer tiles than ranks, take one kernel of their own:
// kernels/gemm/decode_matmul_all_reduce.h.)
//
// Epochs. The GEMM bumps ready[t] once per call that has tile t; seen[t] (local)
// counts the calls consumed, so a consumer waits for ready[t] >= seen[t] + 1.
// Everything else uses the call epoch e (one counter per rank, +1 per consumer
// call, equal on every rank): flags carry e (wrap-safe "reached") and receive
// slots are double-buffered by e & 1.
// Entry: every consumer CTA starts with a handshake (enter_call, kChannelTiles flags
// kMaxTiles + src): it pushes nothing before every peer has entered the same call,
// so a peer still copying out the previous call's sums, of another shape or
// another schedule over the same region, is never overwritten. The handshake runs
// while the GEMM computes its first tiles.
// Why two slots suffice: a rank writes recv[e & 1] again only in call e + 2, after
// it finished call e + 1, which needed data that every peer sent in call e + 1,
// i.e. after that peer finished reading call e (each rank owns a tile, as there
// are at least W tiles).
#pragma once

#include <cuda_runtime.h>

#include "distfuse/params.h"

namespace distfuse {

struct TileAllReduceParams {
  void* output;        // [M, N] row-major, this rank's result
  const void* bias;    // [N] or null, added once
  int m, n;            // GEMM output shape (N multiple of 8)
  int tile_m, tile_n;  // the GEMM's tile shape
  DType dtype;         // kBFloat16 or kFloat16
  int group;           // tiles a consumer CTA pushes per round of flag releases
  CommHandle comm;
};

// Bytes of the workspace tile region a call needs: D and 2 x W receive slots.
uint64_t tile_region_bytes(int m, int n, int esize, int world);
// Most output tiles one call may have (flag slots per (tile, source rank)).
int tile_all_reduce_max_tiles();
// Where this rank's GEMM writes D (row-major, ld = N) and bumps its tile flags.
void* tile_partial(const CommHandle& c);
uint32_t* tile_ready_flags(const CommHandle& c);

// The owner schedule on `blocks` CTAs; cudaErrorInvalidValue with fewer tiles than ranks.
cudaError_t launch_tile_all_reduce(const TileAllReduceParams& p, int blocks, cudaStream_t stream);

}  // namespace distfuse
