// All-reduce kernels over a symmetric workspace (torch-free).
//
// one-shot (small sizes, latency-bound): every rank pushes its whole input to
//   every peer as 16-byte "LL" lines {data, flag, data, flag}; each rank then sums
//   the W contributions in rank order. One NVLink crossing, no barrier.
//
//     rank r:  input ──push line──▶ peer p slot[parity][r]   (for every p != r)
//              slot[parity][0..W-1] ──poll flags, Σ in rank order──▶ output
//
// two-shot (large sizes, bandwidth-bound): reduce-scatter then all-gather, both
//   by pushes, pipelined per block and chunk with per-block flags.
//
//     step j of block b (chunk j of every shard):
//     phase 0  rank r pushes chunk j of shard p to peer p ─flag─▶ p
//     reduce   rank r sums chunk j of its own shard in rank order (+ bias)
//     phase 1  rank r pushes the sum to every peer ─flag─▶ peers; peers copy it out
//
// two-shot LL (mid sizes at W >= 3): the two-shot's reduce-scatter and all-gather
//   with every byte in LL lines, so no fence and no barrier: twice the bytes of
//   the two-shot, a third of the one-shot's at W = 4.
//
//     thread (line j of every shard):
//     phase 0  rank r sends line j of shard p to p ──LL──▶ p
//     reduce   owner p waits for W-1 lines, sums in rank order (+ bias) ─▶ output
//     phase 1  owner p sends the sum ──LL──▶ every peer; peers wait for it ─▶ output
//
// two-shot LL128 (mid sizes at W >= 3 on NVLink-connected Hopper GPUs): the same
//   schedule on 128-byte lines of 120 payload bytes and a flag, each written and read
//   by one warp instruction of 8 lanes (see ll128_store in distfuse/comm/signal.cuh
//   for what that relies on): no fence, and 1.07x the two-shot's bytes instead of 2x.
//
// one-shot LL128 (W = 2 at mid sizes; NVLink Hopper groups): the one-shot's schedule
//   on LL128 lines, in the LL128 two-shot's region. At W = 2 it carries the two-shot's
//   bytes with one hop fewer.
//
// All five sum in fp32 in the fixed order rank 0, 1, ..., W-1 and round once, so
// every rank gets the same bits, whichever algorithm ran.
//
// Options in AllReduceParams: the one-shot's CTA geometry (2 or 1 lines per
// thread; each geometry has its own epochs and LL slots), the two-shot's CTAs and
// chunk, and a programmatic dependent launch (the kernel starts during the
// previous kernel's tail and waits for it before touching memory).
#pragma once

#include <cuda_runtime.h>

#include "distfuse/params.h"

namespace distfuse {

// Most elements a one-shot call can carry for this dtype.
int64_t all_reduce_one_shot_max_numel(DType dtype);
cudaError_t launch_all_reduce_one_shot(const AllReduceParams& p, cudaStream_t stream);
cudaError_t launch_all_reduce_two_shot(const AllReduceParams& p, cudaStream_t stream);
// Largest all-reduce the LL two-shot takes (its line region holds one shard per rank).
int64_t all_reduce_two_shot_ll_max_numel(DType dtype, int world);
cudaError_t launch_all_reduce_two_shot_ll(const AllReduceParams& p, cudaStream_t stream);
// Largest all-reduce the LL128 two-shot takes, and its launch (NVLink Hopper groups only).
int64_t all_reduce_two_shot_ll128_max_numel(DType dtype, int world);
cudaError_t launch_all_reduce_two_shot_ll128(const AllReduceParams& p, cudaStream_t stream);
// Largest all-reduce the LL128 one-shot takes (it runs in the LL128 two-shot's region and
// epochs), and its launch (NVLink Hopper groups only).
int64_t all_reduce_one_shot_ll128_max_numel(DType dtype);
cudaError_t launch_all_reduce_one_shot_ll128(const AllReduceParams& p, cudaStream_t stream);

}  // namespace distfuse
