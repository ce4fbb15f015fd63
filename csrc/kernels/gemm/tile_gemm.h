// Hopper GEMM that publishes a readiness flag per output tile (torch-free).
//
//   D[M, N] = A[M, K] @ B[K, N]      bf16/fp16 in and out, fp32 accumulation
//
// See TileGemmParams (distfuse/params.h) for layouts and the flag contract.
//
// Kernel
// ------
// A persistent, warp-specialized sm_90a kernel of our own (tile_gemm_kernel.cuh)
// composed from CUTLASS's SM90 collectives: the TMA + wgmma mainloop
// (CollectiveMma, MainloopSm90TmaGmmaWarpSpecialized) and the TMA-store epilogue
// (Sm90TmaWarpSpecialized). Our kernel owns the tile schedule, the split-K
// reduction and the flag. One CTA per SM (shared memory is sized so), cluster
// 1x1x1, grid <= sm_count. CTAs never wait for each other, so the kernel
// completes whatever subset of its CTAs is resident at a time.
//
//   CTA = producer warp group (warp 0 issues the TMA loads of A and B)
//       + 1 or 2 consumer warp groups (wgmma, then the epilogue of the tile)
//
// Two configurations, chosen by M (TileGemmParams::tile_shape may name any of
// the four):
//   decode  (M <= 128): 64 x 128 x 64 tile, 1 consumer warp group. Few output
//           tiles and B streamed from HBM dominates, so the K loop of the tiles
//           is spread over all CTAs (stream-K) and every SM streams B.
//   prefill (M >  128): 128 x 256 x 64 tile, 2 consumer warp groups
//           (cooperative); data-parallel, with a stream-K tail when whole waves
//           of tiles would leave SMs idle.
//   mid     (asked for: the tile exchanges at M = 512-1023): 128 x 128 x 64 tile,
//           2 consumer warp groups; twice the prefill tiles, so a tile exchange has
//           a shorter last wave.
//   mid ping-pong (asked for): the mid tile, but each consumer warp group computes
//           whole tiles, the two taking the CTA's tiles in turns, so that one's
//           epilogue (and the flag's wait) runs under the other's MMAs
//           (TileGemmKernel's diagram). Whole tiles only (no stream-K), and not with
//           the epilogue's owner scatter.
//
// Per-tile sequence of the CTA that finishes a tile
// --------------------------------------------------
//   producer warp  : TMA A,B k-blocks ---> smem ring (mbarrier pipeline)
//   consumer WGs   : wgmma over the k-blocks of this work unit (fp32 registers)
//                    [split tile only] store partial sums to the workspace,
//                    arrive on the tile counter; the last arriver adds all
//                    partials in K order and goes on, the others stop here
//   epilogue       : registers -> bf16/fp16 -> smem -> TMA store into D
//                    (consumer warp 0 issues and commits the bulk stores)
//   consumer warp 0: cp.async.bulk.wait_group 0   the tile's writes are done
//                    fence.proxy.async.global      (not just its smem reads) and
//                                                  ordered before generic-proxy
//                                                  operations that follow
//                    red.release.sys.global.add.u32 tile_flags[tm*tiles_n+tn], 1
//
// The release is made by the thread that issued the TMA stores, after they
// completed, so any thread (any GPU) that reads the new flag value with an
// acquire at system scope sees the whole tile. Stores outside [M, N] are
// clipped by TMA; the flag still covers the tile (its in-bounds part).
//
// Tile order
// ----------
// Tiles are numbered 0 .. tiles_m*tiles_n-1 and tile_gemm_tile_coord() maps the
// number to (tm, tn): groups of kTileGemmGroupRows tile rows, column by column
// inside a group (L2 reuse of both A and B across a wave of CTAs):
//
//     tiles_m = 10, tiles_n = 4, group rows = 8       numbers in each cell
//            tn=0  1   2   3
//     tm=0  [  0   8  16  24 ]  -+
//     tm=1  [  1   9  17  25 ]   |
//      ...                       | group 0: 8 rows
//     tm=7  [  7  15  23  31 ]  -+
//     tm=8  [ 32  34  36  38 ]  -+ group 1: the 2 remaining rows
//     tm=9  [ 33  35  37  39 ]  -+
//
// TileGemmParams::last_group_row0 > 0 makes the rows from there one last group of
// their own (the band schedules' last band: the GEMM's last wave, kernels/allreduce/
// band_all_reduce.h); the rows before it are grouped as above.
//
// CTA c of a grid of G computes the data-parallel tiles c, c+G, c+2G, ...
// (whole tiles), so the tiles are published roughly in number order, wave by
// wave. The stream-K tiles are the last numbers: their K range is split evenly
// over all G CTAs and each is published by whichever CTA finishes it last.
//
// Owner scatter (TileGemmParams::scatter_*)
// ----------------------------------------
// The epilogue's TMA stores of tile (tm, tn) go to the rank that owns tile row tm
// (another rank's workspace, mapped here) and the flag is raised there, by the same
// wait, fence and release, but only before the CTA's next tile is stored (or after its
// last), so that the stores to a peer have that tile's MMAs to complete.
// With TileGemmParams::scatter_by_exchange_warps the epilogue stores into D as usual and
// warps 1-3 of the producer warp group copy each tile to its owner and raise the flag
// there (tile_owner_scatter.cuh), so that the TMA unit never waits for NVLink.
//
// Tile exchange (tile_pair_exchange.cuh, tile_owner_exchange.cuh)
// ----------------------------------------------------------------
// With TileGemmParams::exchange_output set, warps 1-3 of the producer warp group
// (idle otherwise) all-reduce every tile of their CTA as the consumers store it and
// write the rank-order sum of all ranks' tiles to exchange_output: two ranks push
// their tiles to each other and both sum (pair exchange); with
// exchange_through_owners, any number of ranks push to each tile's owner, which
// sums and is pulled from. In the pair exchange the consumer warp groups may take
// each CTA's last tile themselves once their last MMA is done
// (exchange_last_tile_in_consumers). The plan
// is then data-parallel (no split tiles: every rank's CTA c computes the same tiles,
// whole, in the same order; `whole_tiles` asks for that plan without the exchange),
// and a one-thread kernel after the GEMM reports a wait of the exchange that timed
// out (the GEMM kernel makes no function call, printf's included: a call would
// serialize its wgmma pipeline). That kernel is the GEMM's programmatic dependent,
// launched while the GEMM runs, so that no launch gap follows the GEMM's last CTA.
//
// Workspace
// ---------
// Stream-K needs an arrival counter per split tile and fp32 partial tiles:
// tile_gemm_workspace_bytes(p) bytes (0 when the plan has no split tiles;
// then `workspace` may be null). The counters sit in a fixed region at the
// start for every shape and every completed launch leaves them at zero, so
// one workspace, zero-filled once when allocated, serves later launches of any
// shape (and CUDA graph replays) without a memset. Launches that may run
// concurrently need separate workspaces; after a failed launch, zero it again.
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

#include "distfuse/params.h"
#include "kernels/gemm/tile_order.h"

namespace distfuse {

// Tile shape the launch for these parameters uses (depends on p.m only).
int tile_gemm_tile_m(const TileGemmParams& p);
int tile_gemm_tile_n(const TileGemmParams& p);

// Device workspace the launch needs (0: none).
size_t tile_gemm_workspace_bytes(const TileGemmParams& p);

// Enqueues D = A @ B on `stream`. Returns
//   cudaErrorInvalidValue   missing pointers, M/N/K < 1, leading dimension too
//                           small, sm_count outside [1, 1024], last_group_row0
//                           outside [0, tile rows), or workspace null (or not
//                           16-byte aligned) when needed;
//   cudaErrorNotSupported   a GEMM this engine does not run (the caller falls
//                           back to cuBLAS): dtype other than bf16/fp16, K or N
//                           or a leading dimension not a multiple of 8, a
//                           pointer not 16-byte aligned;
//   otherwise the launch status.
cudaError_t launch_tile_gemm(const TileGemmParams& p, cudaStream_t stream,
                             void* workspace = nullptr);

}  // namespace distfuse
