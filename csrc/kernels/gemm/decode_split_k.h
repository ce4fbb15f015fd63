// Decode-sized matmul_all_reduce split over K inside thread-block clusters
// (torch-free; sm_90a: wgmma, TMA, clusters).
//
//   out[M, N] = Σ_r A_r[M, K] @ B_r[K, N] (+ bias)        fp32 accumulation
//
// Why: at M of a few dozen to 128 tokens a skinny GEMM whose CTAs each stream all
// of K for their columns rereads the tokens from L2 once per column block, and
// every column is ready only after the last K step, so the all-reduce can only
// follow the GEMM. Here the tokens are read once: the CTAs of a cluster split K,
// each keeps its K slice of the tokens in shared memory for the whole call, and the
// cluster walks its column blocks one after the other. Each block's C partial sums
// meet over distributed shared memory, and the block's rows go to the peers while
// the cluster computes its next block: only the last block's push follows the GEMM.
//
// Geometry
// --------
// Cluster of C CTAs (C = 1, 2, 4 or 8; CTA i owns K slice i, Kc = K / C rounded up
// to 64), Q clusters resident together. Column block b (64 columns) belongs to
// cluster b mod Q, which takes its blocks in order b, b + Q, ...; the block's rows
// are split among the cluster's CTAs (CTA i owns rows [i·R, (i + 1)·R), R = Mt / C,
// Mt the token tile: 8, 16, 32, 64 or 128). C, Mt and the K slices are identical on every
// rank; Q is each GPU's own count of resident clusters, which may differ between ranks
// and needs not match: the flags are per column block and CTA, whoever computes them.
//
// Warps of a CTA
// --------------
//   warp 0      TMA: the weights [64 columns x 64 K] in boxes, 1, 2 or 4 per stage,
//               through a ring of S stages (128-byte swizzle, mbarriers); the first
//               block's stages also bring the token slice's boxes of the same K.
//   warps 4-7   one warpgroup of wgmma m64 x Mt x k16: the weights are the M operand
//               (64 output columns), the tokens the N operand; fp32 accumulators;
//               at the end of a block the partial goes to shared memory.
//   warps 1-3   the block's cluster sum and the push: sum the C partials of the
//               CTA's R rows in CTA order (fp32, over DSMEM), round once to T, store
//               them into every rank's receive slot, release a flag per peer; later,
//               sum the W received partials of the block in rank order (+ bias).
//
// Schedule of one cluster (C = 4) on rank r; blocks b0, b1, b2 of the cluster
// -------------------------------------------------------------------------------
//   warp 0     [w+tokens b0 ......][w b1 ...........][w b2 ...........]
//   wgmma      [K slice x b0 ........]·  [K slice x b1 ....]·  [K slice x b2 ....]·
//                                     │partial b0          │partial b1          │partial b2
//   warps 1-3                         └[Σ4 b0][push b0]─┐   └[Σ4 b1][push b1][ΣW b0]└[Σ4 b2][push b2][ΣW b1][ΣW b2]
//   peer p                                               └──▶ slot_p[r][rows of b0]
// The ring keeps loading while the partials are summed and pushed, so the GEMM
// streams the weights without a gap; only block b2's push and sums follow it.
//
// Barriers: full[s] / empty[s] for the ring (TMA bytes, in the first block with the
// token boxes; wgmma done), partial_full (every CTA of the cluster wrote its
// partial: C remote arrivals after one cluster-scope fence, acquired at cluster
// scope) and partial_empty (every CTA's warps 1-3 read the partials: C arrivals; the
// next block's partial waits for it).
//
// Memory in the tile region of every rank (mn = M·N elements): slot[src] at
// (1 + src)·mn, laid out like out. Flags of kChannelDecodeGemm (shared with the
// one-kernel decode schedule, which never runs at the same time): entry[src] at
// src, received(piece, src) at kMaxWorld·(1 + piece) + src, piece = b·C + i. The
// call epoch is counters(kChannelDecodeGemm)[0]; the last CTA of a call stores it.
//
// Reuse and deadlock freedom as in the one-kernel decode schedule: a rank pushes
// into a peer's slots only after that peer entered the same call; the grid is at
// most the clusters that are resident at once; a CTA waits only for its own
// cluster and for peers' same-numbered CTA, which push every block before they
// wait for a sum. Waits on peers are bounded: a timeout is recorded (this kernel
// may not print, see poll_flag_reached) and reported by the kernel launched after
// it; cluster-internal waits are bounded too (trap).
//
// Where it stands (NOTES.md, v46-v47): correct, but slower than cuBLAS + the all-reduce
// at every measured row, so dispatch never picks it. TMA streams the weights through
// the ring as fast as plain loads (benchmarks/micro/tma_stream_probe.cu); what is left
// is the GEMM alone 3-6 us over cuBLAS at M <= 32 (start, the block boundaries, the
// cluster sum) plus ~5 us of exchange after it, and at M = 128 the 128 KB token slice,
// which leaves a ring of three stages, with the cluster sum over DSMEM (28 KB per CTA
// and block at C = 8) at every block boundary: 2.7x cuBLAS.
//
// Same bits as the unfused order: with all_reduce == false the kernel writes this
// rank's rounded partial (the cluster sum) to `output` and nothing else; the
// distfuse all-reduce of that partial sums in the same rank order, in fp32, and adds
// the bias last.
#pragma once

#include <cuda_runtime_api.h>

#include "distfuse/params.h"

namespace distfuse {

// Whether the kernel takes this call: sm_90 GPU (checked at launch), B given as the
// transposed weight view (K contiguous), M <= 128, N a multiple of 64, K a multiple
// of 8, and a cluster size whose token slice fits shared memory.
bool decode_split_k_shape_supported(int64_t m, int64_t n, int64_t k, bool b_transposed);

// Enqueues the kernel (and, with all_reduce, the timeout check after it) on
// `stream`. cudaErrorInvalidValue for a call it does not take (see
// decode_split_k_shape_supported; 16-byte aligned pointers, lda and ldb multiples of
// 8, bf16 or fp16); else the first failing CUDA status.
cudaError_t launch_decode_split_k_matmul_all_reduce(const DecodeMatmulAllReduceParams& p, cudaStream_t stream);

}  // namespace distfuse
