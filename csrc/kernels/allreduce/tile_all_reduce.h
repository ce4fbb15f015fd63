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
// Owner mode (prefill: bandwidth-bound, 2(W-1)/W·M·N bytes per rank over NVLink):
//
//   GEMM  r0: ─tile0─┬tile1─┬tile2─┬tile3─┬ ...        flag[t] += 1 on each rank
//   GEMM  r1: ─tile0─┼tile1─┼tile2─┼tile3─┼ ...
//                    ▼      ▼      ▼
//   owner o = i % W pulls D_p[t] from every rank p, sums in rank order (+ bias),
//   writes its output and its reduced slot, raises reduced[t];
//   every other rank pulls the reduced slot from o straight into its output.
//
//     i:      0        1        2        3       (W = 2)
//     r0:  reduce   copy←r1  reduce   copy←r1
//     r1:  copy←r0  reduce   copy←r0  reduce
//
// Push mode (decode: latency-bound, few tiles): each rank pushes its finished
// tile to every peer's receive slot (double-buffered by the tile's epoch
// parity), raises a flag there, and sums the W copies it receives.
//
//   r:  D_r[t] ready ──push──▶ peers' recv[parity][r][t] ──flag──▶
//       wait W-1 flags ──Σ in rank order (+ bias)──▶ output
//
// Epochs: the consumer keeps per-tile counters seen[t] (calls consumed). In call
// seen[t]+1 it waits for flag[t] >= seen[t]+1 on each rank (the GEMM increments),
// and the flags it raises itself carry that epoch. Comparisons are wrap-safe.
// Why no extra barriers are needed: an owner writes reduced[t] of the next call
// only after every rank's GEMM produced tile t of that call, i.e. after every rank
// finished this call; a rank's GEMM overwrites D[t] only after its own consumer
// finished this call, which needed every reduced tile, whose owners read D[t] first.
#pragma once

#include <cuda_runtime.h>

#include "distfuse/params.h"

namespace distfuse {

enum class TileReduceMode : int { kOwner = 0, kPush = 1 };

struct TileAllReduceParams {
  void* output;        // [M, N] row-major, this rank's result
  const void* bias;    // [N] or null, added once
  int m, n;            // GEMM output shape (N multiple of 8)
  int tile_m, tile_n;  // the GEMM's tile shape
  DType dtype;         // kBFloat16 or kFloat16
  CommHandle comm;
};

// Bytes of the workspace tile region this call needs (partial D plus the
// reduced or receive slots of `mode`).
uint64_t tile_region_bytes(TileReduceMode mode, int m, int n, int tile_m, int tile_n, int esize,
                           int world);
// Where this rank's GEMM writes D (row-major, ld = N) and bumps its tile flags.
void* tile_partial(const CommHandle& c);
uint32_t* tile_ready_flags(const CommHandle& c);

cudaError_t launch_tile_all_reduce(const TileAllReduceParams& p, TileReduceMode mode, int blocks,
                                   cudaStream_t stream);

}  // namespace distfuse
