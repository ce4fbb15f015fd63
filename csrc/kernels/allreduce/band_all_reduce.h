// All-reduce of a GEMM output band by band (torch-free), in two schedules: the
// bytes moved by the copy engines, or pulled and pushed by a few SMs.
//
// The tile GEMM runs on all SMs but a few and publishes every tile of D_r [M, N]
// (tile region of the workspace, see tile_all_reduce.h). A band is a run of whole
// tile rows; the persistent GEMM finishes its tiles group of tile rows by group,
// so bands (one or more groups) complete in order. Each band is split by rows into
// W shards, shard p owned by rank p. NVLink carries every byte by copy engine
// (cudaMemcpyAsync between symmetric buffers), so the SMs stay with the GEMM; the
// few kernels of the schedule only wait, signal and sum. Per band c, on two side
// streams of rank r:
//
//   stream A (reduce-scatter):
//     wait_ready(c) ─▶ CE push D_r[c, shard p] ─▶ recv_p[r] for every p ≠ r ─▶ signal_landed(c)
//   stream B (reduce, then all-gather):
//     reduce(c): wait W-1 landed(c) ─ Σ in rank order (+ bias) of shard r
//                ─▶ out[c, shard r] and red_r[c, shard r] ─ signal reduced(c, r) to every p
//     wait_reduced(c) ─▶ CE pull red_p[c, shard p] ─▶ out[c, shard p] for every p ≠ r
//
//   main: ─fork─[ tile GEMM on SMs - R - 1 ...................................... ]─join─▶
//   A:         [wait b0][CE push b0][sig][wait b1][CE push b1][sig] ...           ┘
//   B:                                   [Σ b0][wait][CE pull b0][Σ b1][wait][CE pull b1]...┘
//
// Memory, inside the tile region of every rank (mn = M·N elements):
//   D_r at 0, recv_r[src] at (1 + src)·mn for src ≠ r, red_r at (1 + r)·mn
// (the slot a rank never receives into), each laid out like D.
//
// Epochs: counters(kChannelBands)[0] holds the last finished call's epoch e; every
// kernel of a call uses e' = next(e), and the last band's wait_reduced stores e'
// (it is the last kernel of the call to read it: it waits for every peer's sum of
// the last band, which needed this rank's last landed signal). Flags carry e'.
//
// SM-pull schedule (B + 1 kernels of R CTAs, on one side stream; flags and epochs
// of its own channel, same memory). Kernel s gathers band s - 1 and sums band s,
// so that the gather of a band needs no wait (its sums were flagged while this
// rank summed it too) and both halves of each kernel are NVLink pulls:
//
//   kernel s on rank r:
//     gather(s - 1): wait summed(s - 1, p) of every peer ─ pull red_p[s - 1, shard p]
//                    ─▶ out[s - 1, shard p] for every p ≠ r
//     sum(s):        CTA 0: wait this rank's tiles of band s ─ flag ready(s, r) to every
//                    rank; all: wait ready(s, *) ─ Σ in rank order (+ bias) of shard r,
//                    loading every rank's rows from its D (peers' over NVLink)
//                    ─▶ out[s, shard r] and red_r[s, shard r]; last CTA done: flag
//                    summed(s, r) to every peer
//
//   main: ─fork─[ tile GEMM on SMs - R ......................................... ]─join─▶
//   side:      [sum 0][gather 0, sum 1][gather 1, sum 2] ... [gather B-1]──────────┘
//
// Why it cannot deadlock: a kernel waits only for this rank's GEMM (which waits
// for nothing) and for peers' kernels of the same or the previous step, each of
// which waits only for the same. Reuse by the next call: rank r writes red_r of
// band s in call e+1 only after every peer flagged ready(s) in call e+1, i.e. after
// the peer finished call e (and its pulls of red_r); r's GEMM rewrites D in call
// e+1 only after r's call e ended, which waited for every peer's summed(s) of every
// band, i.e. after their loads of r's D.
//
// SM-pull schedule in one persistent kernel (the default; launch_band_pull_persistent):
// the same sums and pulls in one kernel of R CTAs that walks every band, so no
// launch and no grid-wide arrival sits between bands. CTA j owns slice j (of R
// equal vector ranges) of every shard and talks only to CTA j of each peer:
//
//   CTA j of rank r, band s:
//     sum(s):    wait this rank's tiles of s ─ flag ready_j(s) to every peer ─ wait
//                ready_j(s) of every peer ─ Σ in rank order (+ bias) of slice j of
//                shard r ─▶ out and red_r ─ flag summed_j(s) to every peer
//     gather(s): wait summed_j(s) of every peer ─ pull slice j of red_p[s, shard p]
//                ─▶ out for every p ≠ r
//
//   sum_ahead 1 (default):   [sum 0][gather 0][sum 1][gather 1] ... [sum B-1][gather B-1]
//   sum_ahead 2, GEMM ahead: [sum 0][sum 1][gather 0][sum 2][gather 1] ... [gather B-1]
//
// (with 2, a band's gather goes before the next band's sum when that band's tiles
// are not all out yet; beside the GEMM, 1 measured faster: the peers' sums are
// pulled while still in their L2).
//
// Where the GEMM is the bottleneck, the last band's sum and gather are all that is
// left once the GEMM ends, and R CTAs move them slowly; a second kernel (lane 1) of
// more CTAs takes the last T bands on the main stream after the GEMM, on the SMs the
// GEMM frees:
//
//   main: ─fork─[ tile GEMM on SMs - R ............... ][lane 1: bands B-T..B-1]─join─▶
//   side:       [lane 0: sum 0][gather 0][sum 1] ... [gather B-T-1]────────────┘
//
// There the last band is the GEMM's last wave alone (BandAllReduceParams::last_band_row0,
// with the same rows as the tile order's last group), so the band before it is complete
// a wave before the GEMM ends and lane 0 sums it beside that wave; lane 1 is left with
// the last wave's rows only, not a whole band of which most ended a wave or two before:
//
//   tile rows: [band 0: 8] ... [band B-3: 8][band B-2: 6][band B-1: 2]   (M = 8192 on 124 CTAs)
//   GEMM:      ... wave 15 ends band B-2 ─────────────────┘[wave 16]┘
//   lane 0:    ...            [sum B-2][gather B-2] (beside wave 16)
//   lane 1:                                                  [band B-1 after the GEMM]
//
// Or the last T bands go to the two-shot all-reduce (all_reduce.h) after the GEMM: its
// pushes from 128 CTAs move more than any band kernel, and it reads this rank's D rows
// of those bands directly (after the GEMM, in stream order: no tile flag is needed, a
// one-block kernel then counts those tiles as consumed). The peers never read D there:
//
//   main: ─fork─[ tile GEMM on SMs - R ............... ][two-shot of rows of B-T..B-1][consume]─join─▶
//   side:       [lane 0: sum 0][gather 0][sum 1] ... [gather B-T-1]──────────────────────────┘
//
// Flags carry band numbers of a sequence kept per lane in the channel's counters:
// the lane's band first + s of a call whose base is b is b + 1 + s, and the lane's
// last CTA stores b + (its bands) and counts their tiles as consumed. One slot per
// rank and CTA suffices because the values only grow. It cannot deadlock: a CTA
// waits for this rank's GEMM and for CTA j of the peers at the same or an earlier
// band, and the R CTAs fit beside the GEMM's SMs - R CTAs; lane 1 waits only for
// lane 1 of the peers, which starts once their GEMM (which waits for nothing) ended.
// Reuse by the next call: as below, with "every peer's CTA j of the lane" for "every
// peer" (a lane's ready flag of call e+1 is raised after the peer's call e ended).
//
// Owner-scatter schedule (band_scatter): the same persistent kernel, but the GEMM has
// already done the reduce-scatter half. It puts every tile into the owner of the tile's
// rows (the shard of its band, whole tile rows per shard) — rank src's partial into the
// owner's recv[src], the owner's own into its D — and raises the tile's flag on the owner
// (slot src·T + t of its tile flags) once the stores completed. The GEMM's idle exchange
// warps copy each tile there after the epilogue stored it locally (the default), or the
// epilogue's TMA stores go to the owner directly (flag published before the CTA's next
// tile is stored, so the NVLink writes overlap the next tile's MMAs). The band kernel
// then sums W local copies and does the all-gather half by pulls, as before; NVLink
// carries the same bytes as a two-shot all-reduce, half of them moved by the GEMM's SMs
// instead of the band kernel's:
//
//   rank r, tile of band s in shard p:
//     exchange warps:  D_r[t] ─stores─▶ recv_p[r] (p ≠ r) ─ flag(p, r·T + t)  (p = r: the flag only)
//     (or the epilogue: TMA store ─▶ recv_p[r] or D_p ─ wait ─ flag(p, r·T + t))
//   CTA j of rank r, band s:
//     sum(s):    wait every rank's tiles of shard r of s (local flags) ─ Σ in rank order
//                (+ bias) of slice j of the W local copies ─▶ out and red_r ─ flag
//                summed_j(s) to every peer
//     gather(s): as above
//
//   main: ─[entry]─fork─[ tile GEMM on SMs - R, stores scattered to owners ...... ]─join─▶
//   side:              [sum 0][gather 0][sum 1][gather 1] ... [sum B-1][gather B-1]─┘
//
// Entry: the GEMM writes into peers' workspace, so a one-block kernel before it makes
// the handshake (enter_call) on the main stream: no peer is still in an earlier call
// that reads its region (of another layout: another shape or schedule).
//
// Entry (copy-engine schedule): band 0's wait on stream A starts with a handshake
// (enter_call): no copy goes to a peer before it entered the same call, so a peer
// still reading the previous call's data (of another shape or schedule over the
// same region) is never overwritten. The SM-pull schedule needs none: it writes
// only into its own workspace, each band after every peer's ready flag of the call.
// Why single slots suffice: rank r pushes into recv_p[r] in call e+1 only after
// finishing call e, which pulled p's sum of the last band of call e; p computed it
// after all its sums of call e, so p no longer reads recv_p. red_r of call e+1 is
// written only after every peer pushed its call e+1 partial, i.e. after every peer
// finished call e (and its pulls of red_r).
#pragma once

#include <cuda_runtime.h>

#include "kernels/allreduce/band_geometry.h"

namespace distfuse {

// The kernels of the schedule above; each returns the launch error.
cudaError_t launch_band_wait_ready(const BandAllReduceParams& p, int band, cudaStream_t stream);
cudaError_t launch_band_signal_landed(const BandAllReduceParams& p, int band, cudaStream_t stream);
cudaError_t launch_band_reduce(const BandAllReduceParams& p, int band, int blocks, cudaStream_t stream);
cudaError_t launch_band_wait_reduced(const BandAllReduceParams& p, int band, cudaStream_t stream);
// Kernel `step` (0..band_count) of the SM-pull schedule, on `blocks` CTAs (they
// need not be resident together).
cudaError_t launch_band_pull(const BandAllReduceParams& p, int step, int blocks, cudaStream_t stream);
// The same schedule in one persistent kernel of `blocks` CTAs (drawn above) for the
// bands [first_band, end_band); lane 0 or 1, each with its own flags and sequence, so
// that two such kernels can share a call (bands [0, B - T) beside the GEMM, the last T
// on more CTAs after it). A CTA sums up to `sum_ahead` bands (>= 1) before it gathers
// the oldest (2: the order drawn above). Beside the GEMM, the CTAs must all find an
// SM: the GEMM leaves `blocks` SMs free.
cudaError_t launch_band_pull_persistent(const BandAllReduceParams& p, int blocks, int lane, int first_band,
                                        int end_band, int sum_ahead, cudaStream_t stream);

// After the GEMM: this rank's tiles of bands [first_band, end_band) counted as consumed
// (the two-shot tail all-reduced them from D without the tile flags).
cudaError_t launch_band_consume_tiles(const BandAllReduceParams& p, int first_band, int end_band,
                                      cudaStream_t stream);

// The owner-scatter schedule's entry handshake (p.tiles_scattered), before its GEMM.
cudaError_t launch_band_scatter_entry(const BandAllReduceParams& p, cudaStream_t stream);

// The copies of the schedule (cudaMemcpyAsync on `stream`): push this rank's
// shard p of `band` to every peer p, or pull every peer's sum into the output.
cudaError_t band_push_partials(const BandAllReduceParams& p, int band, cudaStream_t stream);
cudaError_t band_pull_sums(const BandAllReduceParams& p, int band, cudaStream_t stream);

}  // namespace distfuse
